// Study page: choosing a series or an instance shows its attributes at once;
// deleting asks once more. Every form also works without this script.
for (const select of document.querySelectorAll("select[data-autosubmit]")) {
  select.addEventListener("change", () => {
    const form = select.form;
    if (select.name === "series" && form.elements.sop) {
      form.elements.sop.disabled = true; // a new series starts at its first instance
    }
    form.submit();
  });
}
for (const form of document.querySelectorAll("form[data-confirm]")) {
  form.addEventListener("submit", (event) => {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  });
}
