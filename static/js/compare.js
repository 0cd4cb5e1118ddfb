(function () {
  "use strict";
  // Changing the model or the evaluation settings shows that selection at once.
  document.querySelectorAll("#compare-filters select.auto-submit").forEach(function (select) {
    select.addEventListener("change", function () {
      if (select.id === "compare-model") {  // another model's settings groups differ: start afresh
        var evalSelect = document.getElementById("compare-eval");
        if (evalSelect) { evalSelect.value = ""; }
      }
      select.form.submit();
    });
  });
  // Colour swatches in the table match each job's colour in the charts (set here, not inline: CSP).
  document.querySelectorAll(".swatch[data-color]").forEach(function (el) {
    el.style.backgroundColor = el.getAttribute("data-color");
  });
  var charts = JSON.parse(document.getElementById("compare-charts").textContent);
  if (charts) {
    compressorCharts.draw("chart-scatter", charts.scatter);
    compressorCharts.draw("chart-bars", charts.bars);
  }
})();
