// groupgate page helpers: copy the new token, confirm revocations, show the date field.
// No inline script anywhere: the Content-Security-Policy allows only this file.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // The page that answers "create" is a POST result: make reload a plain GET of the list,
  // or a reload would post the form again and mint a second token.
  if (location.pathname === "/tokens") history.replaceState(null, "", "/");
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const text = document.getElementById(button.dataset.copy).textContent;
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch (e) {
        const range = document.createRange();
        range.selectNodeContents(document.getElementById(button.dataset.copy));
        const sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        button.textContent = "Selected: press Ctrl+C";
      }
    });
  }
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
  const lifetime = document.getElementById("lifetime");
  const dateField = document.querySelector(".date-field");
  if (lifetime && dateField) {
    const update = () => { dateField.hidden = lifetime.value !== "date"; };
    lifetime.addEventListener("change", update);
    update();
  }
});
