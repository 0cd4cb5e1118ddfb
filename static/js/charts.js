// Draws server-built plotly figures ({data, layout}) into their containers.
window.compressorCharts = {
  draw: function (elementId, figure) {
    var element = document.getElementById(elementId);
    if (!element) { return; }
    if (!figure) { element.style.display = "none"; return; }
    element.style.display = "";
    window.Plotly.react(element, figure.data, figure.layout, {responsive: true, displaylogo: false});
    element.setAttribute("data-rendered", "true");
  }
};
