// New-job form: while the server checks the submission (reading the model's config can take a
// while), the button is disabled and shows a spinner, so the job is not queued twice.
(function () {
  "use strict";
  var button = document.getElementById("submit-job");
  if (!button || !button.form) { return; }
  button.form.addEventListener("submit", function () {
    button.disabled = true;
    button.classList.add("busy");
    button.setAttribute("aria-busy", "true");
    var spinner = document.createElement("span");
    spinner.className = "spinner";
    spinner.setAttribute("aria-hidden", "true");
    button.textContent = " " + (button.getAttribute("data-busy-text") || "Checking…");
    button.insertBefore(spinner, button.firstChild);
  });
  // Back/forward cache: a page shown again must not keep a disabled button.
  window.addEventListener("pageshow", function (event) {
    if (event.persisted) { window.location.reload(); }
  });
})();
