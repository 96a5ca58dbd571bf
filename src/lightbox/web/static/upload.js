// Upload page: files and folders (drag and drop or pickers) go to the archive
// with STOW-RS in parallel batches. Each file's header is read first, so files
// are grouped by study, non-DICOM files and DICOMDIRs are skipped, and every
// result in the STOW response is matched back to its file.

import { readHeader } from "./dicomhead.js";

const BATCH_FILES = 10;
const BATCH_BYTES = 16 * 1024 * 1024;
const IN_FLIGHT = 3;
const HEADER_READERS = 8;
const STOW_URL = "/dicom-web/studies";
const FAILURE_REASONS = {
  0x0110: "processing failure",
  0xa700: "out of resources on the server",
  0xa900: "data set does not match its SOP class",
  0xc000: "cannot be understood",
  0xc409: "belongs to another study",
};

const $ = (id) => document.getElementById(id);
const state = { studies: new Map(), batches: [], skipped: [], running: 0, reading: 0, planning: 0 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function megabytes(bytes) {
  return (bytes / 1048576).toFixed(bytes < 10 * 1048576 ? 1 : 0) + " MB";
}

// ---- collecting files --------------------------------------------------

function entryFile(entry) {
  return new Promise((resolve, reject) => entry.file(resolve, reject));
}

function readEntries(reader) {
  return new Promise((resolve, reject) => reader.readEntries(resolve, reject));
}

/** Every file below a dropped FileSystemEntry, with its relative path. */
async function walk(entry, out) {
  if (entry.isFile) {
    out.push({ file: await entryFile(entry), path: entry.fullPath.replace(/^\//, "") });
    return;
  }
  const reader = entry.createReader();
  // readEntries answers in chunks (about 100 at a time) until it returns none.
  for (let chunk = await readEntries(reader); chunk.length; chunk = await readEntries(reader)) {
    for (const child of chunk) await walk(child, out);
  }
}

async function droppedFiles(dataTransfer) {
  // Entries must be taken while the drop event runs; they are walked afterwards.
  const entries = [];
  const loose = [];
  for (const item of dataTransfer.items) {
    if (item.kind !== "file") continue;
    const entry = item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
    if (entry) entries.push(entry);
    else if (item.getAsFile()) loose.push(item.getAsFile());
  }
  const out = loose.map((file) => ({ file, path: file.name }));
  for (const entry of entries) await walk(entry, out);
  return out;
}

function pickedFiles(input) {
  return Array.from(input.files, (file) => ({ file, path: file.webkitRelativePath || file.name }));
}

// ---- reading headers and planning batches ------------------------------

async function readAll(items) {
  const results = new Array(items.length);
  let next = 0;
  state.reading += items.length;
  showActivity();
  async function reader() {
    while (next < items.length) {
      const i = next++;
      results[i] = { ...items[i], header: await readHeader(items[i].file) };
      state.reading--;
      showActivity();
    }
  }
  await Promise.all(Array.from({ length: HEADER_READERS }, reader));
  return results;
}

async function addFiles(items) {
  if (!items.length) return;
  items.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  state.planning++;
  $("summary").hidden = true;
  for (const item of await readAll(items)) {
    if (item.header.kind !== "dicom") {
      state.skipped.push(item);
      addSkippedRow(item);
      continue;
    }
    studyOf(item.header).pending.push(makeFile(item));
  }
  for (const study of state.studies.values()) planBatches(study);
  renderSkipped();
  state.planning--;
  pump();
}

function makeFile(item) {
  return { file: item.file, path: item.path, size: item.file.size,
           sop: item.header.sopInstanceUID, status: "queued", reason: "", row: null };
}

function studyOf(header) {
  const uid = header.studyInstanceUID || "";
  let study = state.studies.get(uid);
  if (!study) {
    study = { uid, header, files: [], pending: [], total: 0 };
    state.studies.set(uid, study);
    study.view = studyView(study);
    $("studies").append(study.view.root);
  }
  return study;
}

function planBatches(study) {
  let batch = null;
  for (const f of study.pending) {
    if (!batch || batch.files.length >= BATCH_FILES || (batch.bytes + f.size > BATCH_BYTES)) {
      batch = { study, files: [], bytes: 0, loaded: 0, status: "pending" };
      state.batches.push(batch);
    }
    batch.files.push(f);
    batch.bytes += f.size;
    study.files.push(f);
    study.total += f.size;
    f.row = fileRow(f);
    study.view.rows.append(f.row);
  }
  study.pending = [];
  updateStudy(study);
}

// ---- sending -----------------------------------------------------------

function boundary() {
  const random = new Uint8Array(12);
  crypto.getRandomValues(random);
  return "lightbox-" + Array.from(random, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** POST one batch as multipart/related; resolves to {status, text, warning}. */
function send(batch) {
  return new Promise((resolve) => {
    const mark = boundary();
    const parts = [];
    for (const f of batch.files) {
      parts.push(`--${mark}\r\nContent-Type: application/dicom\r\n\r\n`, f.file, "\r\n");
    }
    parts.push(`--${mark}--\r\n`);
    const body = new Blob(parts);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", STOW_URL);
    xhr.withCredentials = true;
    xhr.setRequestHeader("Content-Type", `multipart/related; type="application/dicom"; boundary=${mark}`);
    xhr.setRequestHeader("Accept", "application/dicom+json");
    xhr.upload.onprogress = (e) => {
      batch.loaded = Math.min(e.loaded / body.size, 1) * batch.bytes;
      updateStudy(batch.study);
    };
    const done = () => resolve({ status: xhr.status, text: xhr.responseText,
                                 warning: xhr.getResponseHeader("Warning") || "" });
    xhr.onload = done;
    xhr.onerror = xhr.onabort = xhr.ontimeout = () => resolve({ status: 0, text: "", warning: "" });
    xhr.send(body);
  });
}

function pump() {
  while (state.running < IN_FLIGHT) {
    const batch = state.batches.find((b) => b.status === "pending");
    if (!batch) break;
    batch.status = "sending";
    state.running++;
    for (const f of batch.files) setStatus(f, "sending", "");
    send(batch).then((answer) => {
      state.running--;
      settle(batch, answer);
      updateStudy(batch.study);
      pump();
    });
  }
  showActivity();
}

/** Notes of the Warning header: reasons by part number (1-based). */
function warningNotes(header) {
  const notes = new Map();
  const quoted = header.match(/"(.*)"/);
  if (!quoted) return notes;
  for (const m of quoted[1].matchAll(/part (\d+)(?: \([^)]*\))?: (.*?)(?=; part \d+|$)/g)) {
    notes.set(Number(m[1]), m[2]);
  }
  return notes;
}

function firstValue(item, tag) {
  const value = item && item[tag] && item[tag].Value;
  return value ? value[0] : undefined;
}

function settle(batch, answer) {
  if (answer.status === 0 || answer.status >= 500) {
    batch.status = "failed";
    batch.loaded = 0;
    const why = answer.status ? `server error ${answer.status}` : "network error";
    for (const f of batch.files) setStatus(f, "failed", why);
    return;
  }
  batch.status = "done";
  batch.loaded = batch.bytes;
  let body = {};
  try { body = JSON.parse(answer.text || "{}"); } catch { body = {}; }
  if (![200, 202, 409].includes(answer.status)) {
    const why = body.error || `refused (HTTP ${answer.status})`;
    for (const f of batch.files) setStatus(f, "rejected", why);
    return;
  }
  const results = new Map();  // SOP Instance UID -> results in response order
  const remember = (uid, result) => results.set(uid, [...(results.get(uid) || []), result]);
  for (const item of (body["00081199"] || {}).Value || []) {
    remember(firstValue(item, "00081155"), { status: "stored" });
  }
  for (const item of (body["00081198"] || {}).Value || []) {
    const code = firstValue(item, "00081197");
    remember(firstValue(item, "00081155"), { status: "rejected", code });
  }
  const notes = warningNotes(answer.warning);
  batch.files.forEach((f, i) => {
    const note = notes.get(i + 1);
    const result = (results.get(f.sop) || []).shift();
    if (!result) {
      setStatus(f, "rejected", note || "the server did not report on this file");
    } else if (result.status === "stored" && note && note.includes("already stored")) {
      setStatus(f, "duplicate", "already in the archive");
    } else if (result.status === "rejected") {
      setStatus(f, "rejected", note || FAILURE_REASONS[result.code] || "refused");
    } else {
      setStatus(f, "stored", "");
    }
  });
}

function retryFailed() {
  for (const batch of state.batches) {
    if (batch.status !== "failed") continue;
    batch.status = "pending";
    for (const f of batch.files) setStatus(f, "queued", "");
  }
  $("summary").hidden = true;
  pump();
}

// ---- showing progress and results --------------------------------------

function studyView(study) {
  const h = study.header;
  const title = [h.patientName || "(no name)", h.studyDescription || "(no description)"].join(" · ");
  const bar = el("progress", { max: 1, value: 0 });
  const counts = el("span", { class: "muted" });
  const rows = el("tbody");
  const table = el("table", { class: "files" },
    el("thead", {}, el("tr", {}, el("th", {}, "File"), el("th", {}, "Result"), el("th", {}, "Detail"))),
    rows);
  const root = el("section", { class: "card upload-study", "data-study": study.uid },
    el("h2", {}, title),
    el("p", { class: "muted" }, [h.patientID && `ID ${h.patientID}`, h.studyDate, h.modality]
      .filter(Boolean).join(" · ")),
    bar, counts, el("details", {}, el("summary", {}, "Files"), table));
  return { root, bar, counts, rows };
}

function fileRow(f) {
  return el("tr", { class: "file", "data-status": f.status, "data-sop": f.sop },
    el("td", { class: "path" }, f.path), el("td", { class: "status" }, f.status),
    el("td", { class: "reason" }, ""));
}

function setStatus(f, status, reason) {
  f.status = status;
  f.reason = reason;
  f.row.dataset.status = status;
  f.row.querySelector(".status").textContent = status;
  f.row.querySelector(".reason").textContent = reason;
}

function updateStudy(study) {
  const mine = state.batches.filter((b) => b.study === study);
  const sent = mine.reduce((sum, b) => sum + (b.status === "failed" ? 0 : b.loaded), 0);
  study.view.bar.value = study.total ? sent / study.total : 1;
  const finished = study.files.filter((f) => !["queued", "sending", "failed"].includes(f.status));
  study.view.counts.textContent =
    ` ${megabytes(sent)} of ${megabytes(study.total)} · ${finished.length} of ${study.files.length} files`;
}

function addSkippedRow(item) {
  $("skipped-rows").append(el("tr", { class: "file", "data-status": "skipped" },
    el("td", { class: "path" }, item.path), el("td", { class: "status" }, "skipped"),
    el("td", { class: "reason" }, item.header.reason)));
}

function renderSkipped() {
  $("skipped").hidden = state.skipped.length === 0;
  $("skipped-count").textContent = String(state.skipped.length);
}

function showActivity() {
  const busy = state.planning > 0 || state.running > 0
    || state.batches.some((b) => b.status === "pending");
  const reading = state.reading ? `Reading ${state.reading} file headers… ` : "";
  $("activity").textContent = busy ? `${reading}Uploading…` : "";
  document.body.dataset.uploading = busy ? "1" : "0";
  if (busy) $("summary").hidden = true;
  else if (state.batches.length || state.skipped.length) showSummary();
}

function showSummary() {
  const files = [...state.studies.values()].flatMap((s) => s.files);
  const count = (status) => files.filter((f) => f.status === status).length;
  const failed = count("failed");
  const parts = [`${count("stored")} stored`, `${count("duplicate")} already there`,
                 `${count("rejected")} rejected`, `${failed} failed`, `${state.skipped.length} skipped`];
  $("summary-text").textContent = parts.join(" · ");
  const links = $("summary-studies");
  links.replaceChildren();
  for (const study of state.studies.values()) {
    if (!study.uid || !study.files.some((f) => f.status === "stored" || f.status === "duplicate")) continue;
    const label = `${study.header.patientName || "(no name)"} · ${study.header.studyDescription || "study"}`;
    links.append(el("li", {}, el("a", { href: `/browse/studies/${encodeURIComponent(study.uid)}` }, label)));
  }
  $("retry").hidden = failed === 0;
  const summary = $("summary");
  summary.dataset.failed = String(failed);
  summary.hidden = false;
}

// ---- wiring ------------------------------------------------------------

function setUp() {
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    droppedFiles(e.dataTransfer).then(addFiles);
  });
  for (const id of ["pick-folder", "pick-files"]) {
    const input = $(id);
    input.addEventListener("change", () => { addFiles(pickedFiles(input)); input.value = ""; });
  }
  $("retry").addEventListener("click", retryFailed);
}

setUp();
