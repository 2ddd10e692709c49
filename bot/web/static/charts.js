// The loss curve of a training and the owner's GPU time per member, drawn with uPlot (served
// from the package, no CDN).
"use strict";

function chartWidth(el) {
  return Math.max(el.clientWidth, 280);
}

async function lossChart() {
  const el = document.getElementById("loss");
  if (!el) return;
  const data = await (await fetch(el.dataset.src, { credentials: "same-origin" })).json();
  el.textContent = "";
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
  new uPlot(opts, [data.step, data.loss], el);
  el.dataset.points = String(data.step.length);
}

async function usageChart() {
  const el = document.getElementById("usage-chart");
  if (!el) return;
  const data = await (await fetch(el.dataset.src, { credentials: "same-origin" })).json();
  el.textContent = "";
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
  new uPlot(opts, [xs, data.seconds.map((s) => s / 60)], el);
  el.dataset.points = String(xs.length);
}

window.loracordLoss = lossChart;
lossChart();
usageChart();
