(function () {
  "use strict";
  var charts = JSON.parse(document.getElementById("compare-charts").textContent);
  if (charts) {
    compressorCharts.draw("chart-scatter", charts.scatter);
    compressorCharts.draw("chart-bars", charts.bars);
  }
})();
