// Reads the header of a DICOM Part 10 file in the browser: the preamble, the
// File Meta Information and the first data elements, in explicit or implicit
// VR little endian (the header of compressed files is explicit VR little
// endian too) and explicit VR big endian. Enough to group files by study before upload; the server
// validates everything again.

const MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10";
const EXPLICIT_BIG = "1.2.840.10008.1.2.2";
const DEFLATED = "1.2.840.10008.1.2.1.99";
const LONG_VRS = new Set(["OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"]);
const UNDEFINED = 0xffffffff;
const ITEM = 0xfffee000;
const ITEM_END = 0xfffee00d;
const SEQUENCE_END = 0xfffee0dd;
const MAX_DEPTH = 16;
const FIRST_READ = 64 * 1024;
const MAX_READ = 4 * 1024 * 1024;

// Elements wanted from the data set; reading stops after the last of them.
const WANTED = {
  0x00080005: "specificCharacterSet",
  0x00080018: "sopInstanceUID",
  0x00080020: "studyDate",
  0x00080060: "modality",
  0x00081030: "studyDescription",
  0x00100010: "patientName",
  0x00100020: "patientID",
  0x0020000d: "studyInstanceUID",
};
const LAST_WANTED = 0x0020000d;

class NeedMore extends Error {}

/** A cursor over the bytes read so far (little endian unless told otherwise). */
class Cursor {
  constructor(buffer, offset) {
    this.view = new DataView(buffer);
    this.bytes = new Uint8Array(buffer);
    this.pos = offset;
    this.little = true;
  }
  need(n) {
    if (this.pos + n > this.view.byteLength) throw new NeedMore();
  }
  u16() { this.need(2); const v = this.view.getUint16(this.pos, this.little); this.pos += 2; return v; }
  u32() { this.need(4); const v = this.view.getUint32(this.pos, this.little); this.pos += 4; return v; }
  /** Whether the element at the cursor has a VR (explicit VR encoding). */
  looksExplicit() {
    this.need(6);
    return /^[A-Z]{2}$/.test(String.fromCharCode(this.bytes[this.pos + 4], this.bytes[this.pos + 5]));
  }
  tag() { const group = this.u16(); return ((group << 16) | this.u16()) >>> 0; }
  text(n) { this.need(n); const b = this.bytes.subarray(this.pos, this.pos + n); this.pos += n; return b; }
  skip(n) { this.need(n); this.pos += n; }
}

function ascii(bytes) {
  return new TextDecoder("latin1").decode(bytes).replace(/[\0 ]+$/, "").trim();
}

function decodeText(bytes, charset) {
  // ISO_IR 192 is UTF-8; the other single-byte sets are close enough to
  // Latin-1 for a label on the upload page.
  const encoding = /ISO_IR 192/.test(charset || "") ? "utf-8" : "latin1";
  return new TextDecoder(encoding).decode(bytes).replace(/[\0 ]+$/, "").trim();
}

/** One element header: {tag, vr, length}; ``explicit`` selects the VR encoding. */
function elementHeader(cur, explicit) {
  const tag = cur.tag();
  if ((tag >>> 16) === 0xfffe) return { tag, vr: null, length: cur.u32() };
  if (!explicit) return { tag, vr: null, length: cur.u32() };
  const vr = String.fromCharCode(cur.bytes[cur.pos] ?? 0, cur.bytes[cur.pos + 1] ?? 0);
  cur.skip(2);
  if (LONG_VRS.has(vr)) { cur.skip(2); return { tag, vr, length: cur.u32() }; }
  return { tag, vr, length: cur.u16() };
}

/** Skip a sequence of undefined length (its items may nest further sequences). */
function skipSequence(cur, explicit, depth) {
  if (depth > MAX_DEPTH) throw new Error("sequences nested too deep");
  for (;;) {
    const item = elementHeader(cur, explicit);
    if (item.tag === SEQUENCE_END) return;
    if (item.tag !== ITEM) throw new Error("malformed sequence");
    if (item.length !== UNDEFINED) { cur.skip(item.length); continue; }
    for (;;) {
      const el = elementHeader(cur, explicit);
      if (el.tag === ITEM_END) break;
      skipValue(cur, el, explicit, depth + 1);
    }
  }
}

function skipValue(cur, el, explicit, depth) {
  if (el.length === UNDEFINED) skipSequence(cur, explicit, depth);
  else cur.skip(el.length);
}

/** The File Meta group: {metaEnd, transferSyntax, sopClassUID, sopInstanceUID}. */
function readMeta(cur) {
  const meta = {};
  for (;;) {
    const start = cur.pos;
    if (start + 2 > cur.view.byteLength) throw new NeedMore();
    if (cur.view.getUint16(start, true) !== 0x0002) { meta.metaEnd = start; return meta; }
    const el = elementHeader(cur, true);
    if (el.length === UNDEFINED) throw new Error("malformed file meta information");
    const value = cur.text(el.length);
    if (el.tag === 0x00020002) meta.sopClassUID = ascii(value);
    if (el.tag === 0x00020003) meta.sopInstanceUID = ascii(value);
    if (el.tag === 0x00020010) meta.transferSyntax = ascii(value);
  }
}

function readDataSet(cur, explicit, found) {
  while (cur.pos < cur.view.byteLength) {
    const el = elementHeader(cur, explicit);
    if (el.tag > LAST_WANTED || el.tag === 0x7fe00010) return;
    const key = WANTED[el.tag];
    if (key && el.length !== UNDEFINED) {
      const value = cur.text(el.length);
      found[key] = key === "patientName" || key === "studyDescription"
        ? decodeText(value, found.specificCharacterSet) : ascii(value);
    } else {
      skipValue(cur, el, explicit, 0);
    }
  }
}

function parse(buffer, complete) {
  const cur = new Cursor(buffer, 0);
  const bytes = cur.bytes;
  const magic = bytes.length >= 132 && ascii(bytes.subarray(128, 132)) === "DICM";
  // Some writers omit the preamble and start with the meta group (0002,xxxx).
  const bare = !magic && bytes.length >= 6 && bytes[0] === 2 && bytes[1] === 0
    && /^[A-Z]{2}$/.test(String.fromCharCode(bytes[4], bytes[5]));
  if (!magic && !bare) return { kind: "skip", reason: "not a DICOM file" };
  cur.pos = magic ? 132 : 0;
  const meta = readMeta(cur);
  if (!meta.sopInstanceUID) return { kind: "skip", reason: "no SOP Instance UID in the file meta" };
  if (meta.sopClassUID === MEDIA_STORAGE_DIRECTORY) {
    return { kind: "skip", reason: "DICOMDIR index (the image files themselves are uploaded)" };
  }
  const found = { kind: "dicom", sopInstanceUID: meta.sopInstanceUID,
                  transferSyntax: meta.transferSyntax || "" };
  const ts = meta.transferSyntax || "";
  if (ts === DEFLATED) return found;  // compressed header: the server reads it
  try {
    cur.little = ts !== EXPLICIT_BIG;
    // Trust the bytes over the declared syntax: some writers mix them up.
    readDataSet(cur, cur.pos < cur.view.byteLength && cur.looksExplicit(), found);
  } catch (err) {
    if (err instanceof NeedMore && !complete) throw err;
    // A header we cannot follow further: upload what we know, the server decides.
  }
  found.sopInstanceUID = found.sopInstanceUID || meta.sopInstanceUID;
  return found;
}

/**
 * Read a File's DICOM header.
 * Resolves to {kind: "dicom", sopInstanceUID, studyInstanceUID, patientName,
 * patientID, studyDescription, studyDate, modality, transferSyntax} or
 * {kind: "skip", reason}.
 */
export async function readHeader(file) {
  let size = Math.min(FIRST_READ, file.size);
  for (;;) {
    const buffer = await file.slice(0, size).arrayBuffer();
    const complete = size >= file.size || size >= MAX_READ;
    try {
      return parse(buffer, complete);
    } catch (err) {
      if (err instanceof NeedMore && !complete) { size = Math.min(size * 4, file.size, MAX_READ); continue; }
      if (err instanceof NeedMore) return { kind: "skip", reason: "truncated DICOM header" };
      return { kind: "skip", reason: `unreadable DICOM header (${err.message})` };
    }
  }
}
