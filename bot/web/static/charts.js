// The loss curve of a training and the owner's GPU time per member, drawn with uPlot (served
// from the package, no CDN).
"use strict";

const charts = [];

function chartWidth(el) {
  return Math.max(el.clientWidth, 280);
}

function keep(chart, el) {
  for (let i = charts.length - 1; i >= 0; i--) {
    if (charts[i][1] === el) charts.splice(i, 1)[0][0].destroy();
  }
  charts.push([chart, el]);
  el.dataset.points = String(chart.data[0].length);
}

// A phone turned sideways, or a window made narrower: the charts follow the page's width.
window.addEventListener("resize", () => {
  for (const [chart, el] of charts) chart.setSize({ width: chartWidth(el), height: 220 });
});

async function lossChart() {
  const el = document.getElementById("loss");
  if (!el) return;
  const data = await (await fetch(el.dataset.src, { credentials: "same-origin" })).json();
  if (!data.step.length) {
    el.textContent = "No step recorded yet.";
    return;
  }
  const opts = {
    width: chartWidth(el),
    height: 220,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { label: "loss" }],
    series: [{ label: "step" }, { label: "loss", stroke: "#5865f2", width: 2 }],
  };
  keep(new uPlot(opts, [data.step, data.loss], el), el);
}

async function usageChart() {
  const el = document.getElementById("usage-chart");
  if (!el) return;
  const data = await (await fetch(el.dataset.src, { credentials: "same-origin" })).json();
  if (!data.members.length) return;
  const xs = data.members.map((_, i) => i);
  const opts = {
    width: chartWidth(el),
    height: 220,
    scales: { x: { time: false, range: [-0.5, xs.length - 0.5] } },
    axes: [
      { values: (u, ticks) => ticks.map((t) => data.members[t] ?? ""), incrs: [1] },
      { label: "GPU minutes" },
    ],
    series: [
      {},
      { label: "GPU minutes", fill: "#5865f2", stroke: "#5865f2", paths: uPlot.paths.bars({ size: [0.6, 64] }), points: { show: false } },
    ],
  };
  keep(new uPlot(opts, [xs, data.seconds.map((s) => s / 60)], el), el);
}

window.loracordLoss = lossChart;
lossChart();
usageChart();
