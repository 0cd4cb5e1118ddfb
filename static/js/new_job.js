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

// Recommend panel: when the model field changes, ask GET /api/recommend?model=... (session auth)
// which presets and group sizes the model's shapes allow and which benchmarked recipe is best per
// bit budget. Everything is built with textContent: nothing from the answer is parsed as HTML.
(function () {
  "use strict";
  var panel = document.getElementById("recommend-panel");
  var input = document.getElementById("id_model");
  if (!panel || !input || !window.fetch) { return; }
  var status = panel.querySelector(".recommend-status");
  var body = panel.querySelector(".recommend-body");
  var source = panel.querySelector(".recommend-source small");
  var timer = null;
  var asked = 0;

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    if (cls) { node.className = cls; }
    return node;
  }

  function table(headers, rows) {
    var t = el("table");
    var head = t.appendChild(el("thead")).appendChild(el("tr"));
    headers.forEach(function (h) { head.appendChild(el("th", h)); });
    var tbody = t.appendChild(el("tbody"));
    rows.forEach(function (row) {
      var tr = tbody.appendChild(el("tr", null, row.cls));
      row.cells.forEach(function (c) { tr.appendChild(el("td", c)); });
    });
    return t;
  }

  function ratio(x) { return (typeof x === "number") ? "×" + x.toFixed(3) : "—"; }

  function render(data) {
    body.textContent = "";
    status.textContent = data.architecture + ", " + data.layers + " layers, Linear input widths " +
      data.input_widths.join(", ") + ".";
    if (data.budgets.length) {
      body.appendChild(el("h3", "Best measured recipe per bit budget"));
      body.appendChild(table(["bits / weight", "recipe", "preset", "ppl ratio (ours)", "llm-compressor"],
        data.budgets.map(function (b) {
          var best = b.best;
          return {cells: [b.bits, best ? best.name : "none allowed for this model",
            best && best.preset ? best.preset.preset + (best.preset.options.group_size ?
              " (group " + best.preset.options.group_size + ")" : "") : "—",
            best ? ratio(best.ours_ratio) : "—", best ? ratio(best.llmcompressor_ratio) : "—"]};
        })));
    }
    body.appendChild(el("h3", "Presets this model's shapes allow"));
    body.appendChild(table(["preset", "allowed", "group sizes"], data.schemes.map(function (s) {
      return {cls: s.allowed ? "allowed" : "not-allowed",
        cells: [s.preset, s.allowed ? "yes" : "no: " + s.reason,
          s.group_sizes ? (s.group_sizes.length ? s.group_sizes.join(", ") : "none") : "—"]};
    })));
    var b = data.benchmark;
    source.textContent = b ? "Ratios: " + b.metric + ", " + b.model + ", " + b.windows + " windows of " +
      b.seqlen + " tokens; peer " + b.peer + "." : "No quality benchmark table in this build.";
  }

  function ask() {
    var model = input.value.trim();
    if (!model) { panel.hidden = true; return; }
    var mine = ++asked;
    panel.hidden = false;
    status.textContent = "Checking " + model + "…";
    body.textContent = "";
    source.textContent = "";
    fetch(panel.getAttribute("data-url") + "?model=" + encodeURIComponent(model),
          {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) {
        return response.json().then(function (data) { return {ok: response.ok, data: data}; });
      })
      .then(function (result) {
        if (mine !== asked) { return; }  // a newer model was typed meanwhile
        if (result.ok) { render(result.data); return; }
        var errors = (result.data && result.data.errors) || [];
        status.textContent = errors.length ? (errors[0].field || "model") + ": " + errors[0].message
                                           : "Could not check this model.";
      })
      .catch(function () { if (mine === asked) { status.textContent = "Could not check this model."; } });
  }

  input.addEventListener("change", ask);
  input.addEventListener("input", function () {
    if (timer) { clearTimeout(timer); }
    timer = setTimeout(ask, 800);
  });
  if (input.value.trim()) { ask(); }
})();
