(function () {
  "use strict";
  var picker = document.getElementById("compare-model");
  if (picker) {
    picker.addEventListener("change", function () { picker.form.submit(); });
  }
  var charts = JSON.parse(document.getElementById("compare-charts").textContent);
  if (charts) {
    compressorCharts.draw("chart-scatter", charts.scatter);
    compressorCharts.draw("chart-bars", charts.bars);
  }
})();
