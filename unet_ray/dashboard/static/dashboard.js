// Renders the sweep (or a train run, shown as a sweep of one trial): header, trials table,
// Plotly charts, predictions and errors.
// Live mode polls api/state every few seconds and updates everything in place (Plotly.react);
// report mode renders the data embedded in the page once. Text from the experiment folder is
// always inserted as text (textContent), never as HTML.
(function () {
  "use strict";

  const config = JSON.parse(document.getElementById("dashboard-config").textContent);
  const embedded = JSON.parse(document.getElementById("dashboard-data").textContent);
  const PLOT_CONFIG = { displaylogo: false, responsive: true };
  const view = { sortKey: "best_val_iou", descending: true, state: null, version: null, predictionsFor: null };

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.entries(props || {}).forEach(([key, value]) => {
      if (value === undefined || value === null) return;
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else if (key.startsWith("data-") || key === "href" || key === "src" || key === "alt" || key === "title") node.setAttribute(key, value);
      else node[key] = value;
    });
    (children || []).forEach((child) => node.appendChild(typeof child === "string" ? document.createTextNode(child) : child));
    return node;
  }

  function formatValue(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "number") {
      if (Number.isInteger(value)) return String(value);
      const abs = Math.abs(value);
      return abs !== 0 && (abs < 1e-3 || abs >= 1e5) ? value.toExponential(2) : value.toPrecision(3);
    }
    return String(value);
  }

  function formatIou(value) { return value === null || value === undefined ? "–" : value.toFixed(4); }

  function formatSeconds(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.round(seconds);
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m " + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(m / 60) + "h " + String(m % 60).padStart(2, "0") + "m";
  }

  function statusBadge(status) {
    return el("span", { className: "badge status-" + status.replace(/\s+/g, "-"), text: status });
  }

  // ---- header -------------------------------------------------------------------------------

  function renderHeader(state) {
    const run = state.kind === "run";
    document.getElementById("experiment-name").textContent = state.name;
    document.getElementById("page-kind").textContent = run ? "Training run" : "Tune results";
    document.title = (run ? "Training run: " : "Tune results: ") + state.name;
    document.getElementById("best-heading").textContent = run ? "Best epoch" : "Best trial";
    document.getElementById("trials-heading").textContent = run ? "Run" : "Trials";
    if (run) document.getElementById("table-hint").textContent = "Epochs and IoU come from the run's history.jsonl.";
    document.getElementById("charts-heading").textContent = run ? "Learning curves and IoU per class" : "Learning curves and search space";
    document.getElementById("predictions-heading").textContent =
      (run ? "Best checkpoint's" : "Best trial's") + " predictions on validation pairs";
    const badge = document.getElementById("sweep-status");
    badge.textContent = (run ? "run " : "sweep ") + state.sweep_status;
    badge.className = "badge status-" + state.sweep_status;
    const counts = {};
    state.trials.forEach((t) => { counts[t.status] = (counts[t.status] || 0) + 1; });
    const parts = Object.entries(counts).map(([status, n]) => n + " " + status);
    document.getElementById("sweep-summary").textContent =
      state.trials.length + " trial" + (state.trials.length === 1 ? "" : "s") + (parts.length ? ": " + parts.join(", ") : "") +
      (state.max_epochs ? " · up to " + state.max_epochs + " epochs" : "");
    const settings = Object.entries(state.settings || {}).filter(([, v]) => v !== null && v !== undefined);
    document.getElementById("settings").textContent = settings.length
      ? "Fixed settings: " + settings.map(([k, v]) => k + " " + formatValue(v)).join(", ") + " · folder " + state.path
      : "Folder " + state.path;
    const warnings = document.getElementById("warnings");
    warnings.replaceChildren(...(state.warnings || []).map((w) => el("li", { text: w })));
    renderUpdated();
  }

  function renderUpdated() {
    const state = view.state;
    if (!state) return;
    const node = document.getElementById("updated");
    if (!state.updated) { node.textContent = ""; return; }
    const when = new Date(state.updated * 1000);
    if (config.mode === "live") {
      node.textContent = "· last change " + formatSeconds(Math.max(0, Date.now() / 1000 - state.updated)) + " ago";
    } else {
      node.textContent = "· last change " + when.toLocaleString() + " · report written " + new Date(config.written * 1000).toLocaleString();
    }
  }

  function renderBest(state) {
    const node = document.getElementById("best");
    const best = state.best;
    if (!best) { node.textContent = "No trial has reported a validation IoU yet."; return; }
    const params = Object.entries(best.params).map(([k, v]) => k + "=" + formatValue(v)).join(", ");
    node.replaceChildren(
      el("strong", { text: best.trial_id }), " — best val_iou ", el("strong", { text: formatIou(best.val_iou) }),
      " at epoch " + best.epoch + (params ? " with " + params : ""),
      el("br"), el("span", { className: "muted", text: "checkpoint: " + (best.checkpoint || "not found in this folder") }),
    );
  }

  // ---- table ----------------------------------------------------------------------------------

  function columns(state) {
    const cols = [
      { key: "trial_id", label: "trial" },
      { key: "status", label: "status" },
      ...state.param_keys.map((p) => ({ key: "param:" + p, label: p, number: true })),
      { key: "epochs", label: "epochs", number: true },
      { key: "best_val_iou", label: "best val_iou", number: true },
      { key: "last_val_iou", label: "last val_iou", number: true },
      { key: "time_s", label: "time", number: true },
    ];
    if (config.mode === "live") cols.push({ key: "files", label: "files", sortable: false });
    return cols;
  }

  function cellValue(trial, key) {
    return key.startsWith("param:") ? trial.params[key.slice(6)] : trial[key];
  }

  function compare(a, b) {
    const va = cellValue(a, view.sortKey), vb = cellValue(b, view.sortKey);
    const missingA = va === null || va === undefined, missingB = vb === null || vb === undefined;
    if (missingA || missingB) return missingA - missingB; // missing values always last
    const order = typeof va === "number" && typeof vb === "number" ? va - vb : String(va).localeCompare(String(vb));
    const bestId = view.state.best ? view.state.best.trial_id : null;
    const bestFirst = (b.trial_id === bestId) - (a.trial_id === bestId);
    return (view.descending ? -order : order) || bestFirst || a.trial_id.localeCompare(b.trial_id);
  }

  function renderTable(state) {
    const cols = columns(state);
    const head = document.querySelector("#trials thead tr");
    head.replaceChildren(...cols.map((col) => {
      const th = el("th", { text: col.label, "data-key": col.key });
      if (col.key === view.sortKey) th.className = "sorted" + (view.descending ? "" : " ascending");
      if (col.sortable !== false) {
        th.addEventListener("click", () => {
          view.descending = view.sortKey === col.key ? !view.descending : col.number === true;
          view.sortKey = col.key;
          renderTable(view.state);
        });
      }
      return th;
    }));
    const bestId = state.best ? state.best.trial_id : null;
    const rows = [...state.trials].sort(compare).map((trial) => {
      const tr = el("tr", { "data-trial-id": trial.trial_id, "data-status": trial.status });
      if (trial.trial_id === bestId) tr.className = "best";
      cols.forEach((col) => {
        const value = cellValue(trial, col.key);
        let td;
        if (col.key === "status") td = el("td", {}, [statusBadge(trial.status)]);
        else if (col.key === "trial_id") td = el("td", { text: trial.trial_id + (trial.trial_id === bestId ? " ★" : "") });
        else if (col.key === "best_val_iou" || col.key === "last_val_iou") td = el("td", { text: formatIou(value) });
        else if (col.key === "time_s") td = el("td", { text: formatSeconds(value) });
        else if (col.key === "epochs") td = el("td", { text: state.max_epochs ? value + "/" + state.max_epochs : String(value) });
        else if (col.key === "files") {
          td = el("td", {}, trial.files.map((f) => el("a", { href: "files/" + f.split("/").map(encodeURIComponent).join("/"), text: f.split("/").pop(), target: "_blank" })));
        } else td = el("td", { text: formatValue(value) });
        td.setAttribute("data-key", col.key);
        if (value !== null && value !== undefined && col.key !== "files") td.setAttribute("data-value", String(value));
        if (col.number) td.classList.add("number");
        tr.appendChild(td);
      });
      return tr;
    });
    document.querySelector("#trials tbody").replaceChildren(...rows);
  }

  // ---- charts, predictions, errors ------------------------------------------------------------

  function renderCharts(state) {
    // The charts are the figures the state holds, in its order (a sweep and a run differ).
    const container = document.getElementById("charts");
    const names = Object.keys(state.figures);
    [...container.children].forEach((div) => {
      if (!names.includes(div.id.replace(/^chart-/, ""))) { Plotly.purge(div); div.remove(); }
    });
    names.forEach((name) => {
      let div = document.getElementById("chart-" + name);
      if (!div) div = el("div", { id: "chart-" + name, className: "chart" });
      container.appendChild(div); // (re)appended: keeps the state's order
      const figure = state.figures[name];
      Plotly.react(div, figure.data, figure.layout, PLOT_CONFIG);
    });
  }

  function renderPredictions(result) {
    const caption = document.getElementById("predictions-caption");
    const grid = document.getElementById("predictions");
    const legend = document.getElementById("legend");
    if (!result || result.error) {
      caption.textContent = result ? result.error : "Waiting for a checkpoint…";
      grid.replaceChildren();
      legend.replaceChildren();
      return;
    }
    caption.textContent = (view.state && view.state.kind === "run" ? "Run " : "Trial ") + result.trial_id + ", epoch " + result.epoch + " checkpoint (" + result.checkpoint +
      "), on the first " + result.samples.length + " validation pairs at " + result.image_size + " px, label set " + result.classes + ".";
    const figures = [];
    result.samples.forEach((sample, i) => {
      const accuracy = sample.pixel_accuracy === null ? "" : " · pixel accuracy " + (100 * sample.pixel_accuracy).toFixed(1) + " %";
      [["photo", "photo #" + (i + 1)], ["truth", "true mask"], ["prediction", "predicted mask" + accuracy]].forEach(([key, label]) => {
        figures.push(el("figure", { "data-kind": key }, [el("img", { src: sample[key], alt: label }), el("figcaption", { text: label })]));
      });
    });
    grid.replaceChildren(...figures);
    legend.replaceChildren(...(result.legend || []).map((entry) => {
      const swatch = el("i");
      swatch.style.background = entry.color;
      return el("span", {}, [swatch, entry.name]);
    }));
  }

  function renderErrors(state) {
    const errored = state.trials.filter((t) => t.error);
    document.getElementById("errors-section").hidden = errored.length === 0;
    document.getElementById("errors").replaceChildren(...errored.flatMap((t) => {
      const params = Object.entries(t.params).map(([k, v]) => k + "=" + formatValue(v)).join(", ");
      return [el("h3", { text: t.trial_id + (params ? " (" + params + ")" : "") }),
              el("pre", { className: "error", "data-trial-id": t.trial_id, text: t.error })];
    }));
  }

  function render(state) {
    view.state = state;
    renderHeader(state);
    renderBest(state);
    renderTable(state);
    renderCharts(state);
    renderErrors(state);
  }

  // ---- live updates ---------------------------------------------------------------------------

  function showConnection(message) {
    const banner = document.getElementById("connection");
    banner.hidden = !message;
    banner.textContent = message || "";
  }

  async function fetchJson(url) {
    const response = await fetch(url, { cache: "no-store" });
    const body = await response.json();
    if (!response.ok) {
      const error = new Error(body.error || response.status + " " + response.statusText);
      error.fromServer = true; // the server answered, with a reason (e.g. the experiment folder is gone)
      throw error;
    }
    return body;
  }

  async function refreshPredictions(state) {
    const best = state.best;
    const key = best ? best.trial_id + "|" + best.checkpoint : null;
    if (key === view.predictionsFor) return;
    view.predictionsFor = key;
    if (!best) { renderPredictions(null); return; }
    document.getElementById("predictions-caption").textContent = "Computing the predictions of " + best.trial_id + "…";
    try {
      const result = await fetchJson("api/predictions");
      if (view.predictionsFor === key) renderPredictions(result);
    } catch (error) {
      view.predictionsFor = null; // try again on the next refresh
      renderPredictions({ error: "predictions unavailable: " + error.message });
    }
  }

  async function poll() {
    try {
      const state = await fetchJson("api/state");
      showConnection(null);
      if (state.version !== view.version) {
        view.version = state.version;
        render(state);
      }
      renderUpdated();
      refreshPredictions(state); // not awaited: a first model load must not hold up the table
    } catch (error) {
      showConnection((error.fromServer ? "The dashboard server cannot show the sweep: " + error.message
                                       : "Cannot reach the dashboard server (" + error.message + ")") +
                     "; retrying every " + config.refresh_s + " s.");
    } finally {
      window.setTimeout(poll, config.refresh_s * 1000);
    }
  }

  if (config.mode === "report") {
    render(embedded.state);
    renderPredictions(embedded.predictions);
  } else {
    poll();
  }
})();
