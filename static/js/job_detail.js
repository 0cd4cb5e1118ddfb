// Polls the job's status endpoint and swaps in the server-rendered partials until the job ends.
(function () {
  "use strict";
  var script = document.getElementById("job-detail-script");
  var url = script.getAttribute("data-status-url");
  var finished = JSON.parse(document.getElementById("job-finished").textContent);
  var delayMs = 1500;
  var lastLossPoints = -1;

  function drawCharts(charts) {
    if (!charts || !window.compressorCharts) { return; }
    compressorCharts.draw("chart-recovery", charts.recovery);
    // The loss chart grows layer by layer; redraw only when it changed.
    var points = charts.layer_loss ? JSON.stringify(charts.layer_loss.data).length : 0;
    if (points !== lastLossPoints) {
      compressorCharts.draw("chart-layer-loss", charts.layer_loss);
      lastLossPoints = points;
    }
    compressorCharts.draw("chart-reconstruction", charts.reconstruction);
    compressorCharts.draw("chart-autoround", charts.autoround);
    compressorCharts.draw("chart-finetune-loss", charts.finetune_loss);
  }
  drawCharts(JSON.parse(document.getElementById("job-charts").textContent));

  function poll() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (!response.ok) { throw new Error("status " + response.status); }
        return response.json();
      })
      .then(function (data) {
        if (data.status !== "queued") {  // the "Job queued." notice is stale once a worker has it
          document.querySelectorAll(".flash.job-queued").forEach(function (el) { el.remove(); });
        }
        document.getElementById("progress").innerHTML = data.progress_html;
        document.getElementById("results").innerHTML = data.results_html;
        drawCharts(data.charts);
        document.dispatchEvent(new CustomEvent("job:update", {detail: data}));
        if (!data.finished) { setTimeout(poll, delayMs); }
        else {
          document.body.setAttribute("data-job-finished", "true");
          if (!document.getElementById("model-card")) { window.location.reload(); }  // show the card
        }
      })
      .catch(function () { setTimeout(poll, delayMs * 4); });
  }

  if (!finished) { setTimeout(poll, delayMs); }
  else { document.body.setAttribute("data-job-finished", "true"); }
})();
