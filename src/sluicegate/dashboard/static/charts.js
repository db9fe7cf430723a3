// Line charts of the traffic series (uPlot, vendored under vendor/uplot, MIT).
// One chart per measure; one line per route plus the total. The set of lines follows
// the busiest routes, so a chart is rebuilt when that set changes and only fed new data
// otherwise (uPlot redraws a 120-point chart in well under a millisecond).
import uPlot from "./vendor/uplot/uPlot.esm.js";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
  "#e377c2", "#17becf", "#bcbd22"];
const HEIGHT = 180;

// measure -> how a value from the JSON is shown (rates as is, shares in %, seconds in ms)
// and the least top of its y axis (an idle gateway still gets a readable axis; a share
// always spans 0..100 %)
const MEASURES = {
  rps: { scale: (v) => v, digits: 1, top: 1 },
  error_rate: { scale: (v) => v * 100, digits: 1, top: 100, fixed: true },
  p50: { scale: (v) => v * 1000, digits: 2, top: 1 },
  p99: { scale: (v) => v * 1000, digits: 2, top: 1 },
};

function scaled(values, measure) {
  const { scale } = MEASURES[measure];
  return values.map((v) => (v === null || v === undefined ? null : scale(v)));
}

export class TrafficChart {
  constructor(element, measure) {
    this.element = element;
    this.measure = measure;
    this.plot = null;
    this.lines = "";
    this.window = [0, 1]; // the x range: the whole window asked for, filled or not
  }

  width() {
    return Math.max(this.element.clientWidth, 240);
  }

  update(series, seconds) {
    const last = series.t.length ? series.t[series.t.length - 1] : Date.now() / 1000;
    this.window = [last - seconds, last];
    const routes = Object.keys(series.routes);
    const lines = ["all", ...routes].join("\u0000");
    const data = [series.t, scaled(series.all[this.measure], this.measure),
      ...routes.map((r) => scaled(series.routes[r][this.measure], this.measure))];
    if (this.plot === null || lines !== this.lines) {
      this.build(routes, data);
      this.lines = lines;
    } else {
      this.plot.setData(data);
    }
  }

  build(routes, data) {
    if (this.plot !== null) {
      this.plot.destroy();
    }
    const top = MEASURES[this.measure];
    const digits = top.digits;
    const value = (u, v) => (v === null || v === undefined ? "–" : v.toFixed(digits));
    const options = {
      width: this.width(),
      height: HEIGHT,
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      scales: {
        x: { time: true, range: () => this.window },
        y: { range: (u, min, max) => [0, top.fixed ? top.top : Math.max((max ?? 0) * 1.1, top.top)] },
      },
      axes: [{}, { size: 50 }],
      series: [
        {},
        { label: "all routes", stroke: "#555", width: 2, dash: [4, 3], value },
        ...routes.map((route, i) => ({
          label: route === "" ? "(no route)" : route,
          stroke: PALETTE[i % PALETTE.length],
          width: 1.5,
          value,
        })),
      ],
    };
    this.element.replaceChildren();
    this.plot = new uPlot(options, data, this.element);
  }

  resize() {
    if (this.plot !== null) {
      this.plot.setSize({ width: this.width(), height: HEIGHT });
    }
  }
}
