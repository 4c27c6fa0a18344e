// mechnb's attribution graph view (an anywidget module; shipped in the package, fetches nothing).
//
// Layers run bottom to top (token embeddings at the bottom, logits at the top), positions left
// to right. Edge width follows |weight|, colour its sign (blue positive, red negative). Hover a
// node for its label and top contexts; click toggles it in the selection; shift-click puts the
// selection and the clicked node into a new supernode, named by the box above the panel
// (`supernode N` when empty), drawn as a box around them; click its name to select its members. The selection and the supernodes are synced to Python
// (`GraphWidget.selected`, `.supernodes`). Every text is set with textContent: tokens and
// labels are never parsed as HTML.

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = { feature: "#4b5563", error: "#9ca3af", embedding: "#059669", logit: "#7c3aed" };

function make(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

function render({ model, el }) {
  const data = model.get("data");
  const root = document.createElement("div");
  root.className = "mechnb-graph";
  root.style.cssText = "display:flex;gap:12px;align-items:flex-start;font:12px sans-serif;";
  el.appendChild(root);

  const nPos = data.tokens.length, nLayers = data.n_layers;
  // Columns wide enough for the busiest (layer, position) cell, within reason.
  const counts = {};
  for (const node of data.nodes) counts[`${node.layer}:${node.pos}`] = (counts[`${node.layer}:${node.pos}`] || 0) + 1;
  const busiest = Math.max(1, ...Object.values(counts));
  const left = 56, bottom = 46, top = 16, colW = Math.max(70, Math.min(180, 10 + 5 * busiest)), rowH = 20;
  const width = left + nPos * colW + 20, height = top + (nLayers + 2) * rowH + bottom;
  // Scaled to the width the cell gives it (the whole prompt in view), never below 60 %.
  const holder = document.createElement("div");
  holder.style.cssText = `flex:1 1 auto;min-width:0;overflow-x:auto;`;
  root.appendChild(holder);
  const svg = make("svg", { viewBox: `0 0 ${width} ${height}`, class: "mechnb-graph-svg", role: "img" }, holder);
  svg.style.cssText = `width:100%;min-width:${Math.round(0.6 * width)}px;max-width:${width}px;height:auto;`;
  const panel = document.createElement("div");
  panel.className = "mechnb-graph-panel";
  panel.style.cssText = "min-height:120px;border:1px solid #ddd;padding:8px;white-space:pre-wrap;" +
    "overflow-wrap:anywhere;";
  panel.textContent = data.title + "\n\nHover a node for its label and contexts; click to select, " +
    "shift-click to group the selection into a supernode.";
  const side = document.createElement("div");
  side.style.cssText = "flex:0 0 260px;display:flex;flex-direction:column;gap:6px;";
  const naming = document.createElement("input");
  naming.className = "mechnb-graph-supernode-name";
  naming.placeholder = "name of the next supernode";
  naming.style.cssText = "font:12px sans-serif;padding:3px;";
  side.appendChild(naming);
  side.appendChild(panel);
  root.appendChild(side);

  // Rows: embeddings (-1) at the bottom, layers 0..L-1, logits (L) at the top.
  const rowY = row => top + (nLayers - row) * rowH + rowH / 2;
  const colX = pos => left + pos * colW + colW / 2;
  const groups = {};
  for (const node of data.nodes) {
    const row = node.kind === "embedding" ? -1 : node.kind === "logit" ? nLayers : node.layer;
    const key = `${row}:${node.pos}`;
    (groups[key] = groups[key] || []).push(node);
    node.row = row;
  }
  for (const members of Object.values(groups)) {
    const step = Math.min(12, (colW - 8) / Math.max(members.length, 1));
    members.forEach((node, i) => {
      node.x = colX(node.pos) + (i - (members.length - 1) / 2) * step;
      node.y = rowY(node.row);
    });
  }
  const byName = Object.fromEntries(data.nodes.map(n => [n.name, n]));

  // Axes: layer numbers on the left, tokens under their columns.
  for (let layer = 0; layer < nLayers; layer += Math.max(1, Math.ceil(nLayers / 15))) {
    make("text", { x: 4, y: rowY(layer) + 4, fill: "#6b7280" }, svg).textContent = `L${layer}`;
  }
  make("text", { x: 4, y: rowY(-1) + 4, fill: "#6b7280" }, svg).textContent = "emb";
  make("text", { x: 4, y: rowY(nLayers) + 4, fill: "#6b7280" }, svg).textContent = "logit";
  data.tokens.forEach((token, pos) => {
    const label = make("text", { x: colX(pos), y: height - bottom + 18, "text-anchor": "middle",
                                  class: "mechnb-graph-token" }, svg);
    label.textContent = token.length > 10 ? token.slice(0, 9) + "…" : token;
  });

  const edgeLayer = make("g", { class: "mechnb-graph-edges" }, svg);
  const boxLayer = make("g", { class: "mechnb-graph-supernodes" }, svg);
  const nodeLayer = make("g", { class: "mechnb-graph-nodes" }, svg);
  const maxWeight = Math.max(1e-12, ...data.edges.map(e => Math.abs(e.w)));
  for (const edge of data.edges) {
    const s = byName[edge.s], t = byName[edge.t];
    if (!s || !t) continue;
    make("line", { x1: s.x, y1: s.y, x2: t.x, y2: t.y, stroke: edge.w > 0 ? "#2563eb" : "#dc2626",
                   "stroke-opacity": 0.35, "stroke-width": 0.3 + 3 * Math.abs(edge.w) / maxWeight,
                   "data-source": edge.s, "data-target": edge.t }, edgeLayer);
  }

  const circles = {};
  // The most influential nodes are drawn last, on top of the others.
  const drawOrder = [...data.nodes].sort((a, b) => (a.influence || 0) - (b.influence || 0));
  for (const node of drawOrder) {
    const shape = node.kind === "error"
      ? make("rect", { x: node.x - 3.5, y: node.y - 3.5, width: 7, height: 7 }, nodeLayer)
      : make("circle", { cx: node.x, cy: node.y, r: node.kind === "feature" ? 4 : 5 }, nodeLayer);
    shape.setAttribute("fill", COLOURS[node.kind]);
    shape.setAttribute("class", "mechnb-graph-node");
    shape.setAttribute("data-node", node.name);
    shape.setAttribute("data-influence", node.influence === null ? 0 : node.influence);
    shape.style.cursor = "pointer";
    circles[node.name] = shape;
    shape.addEventListener("mouseenter", () => show(node));
    shape.addEventListener("click", event => {
      if (event.shiftKey) group(node.name);
      else toggle(node.name);
    });
  }

  function show(node) {
    const lines = [node.name, `${node.kind}${node.token ? " at " + JSON.stringify(node.token) : ""}`];
    if (node.activation !== null && node.activation !== undefined) lines.push(`activation ${node.activation.toPrecision(3)}`);
    if (node.influence !== null && node.influence !== undefined) lines.push(`influence ${node.influence.toPrecision(3)}`);
    if (node.label) lines.push("", node.label);
    if (node.contexts && node.contexts.length) lines.push("", "top contexts:", ...node.contexts.map(c => "· " + c));
    panel.textContent = lines.join("\n");
    for (const line of edgeLayer.children) {
      const on = line.dataset.source === node.name || line.dataset.target === node.name;
      line.setAttribute("stroke-opacity", on ? 0.9 : 0.12);
    }
  }

  function toggle(name) {
    const selected = new Set(model.get("selected"));
    if (selected.has(name)) selected.delete(name); else selected.add(name);
    model.set("selected", [...selected]);
    model.save_changes();
  }

  function group(name) {
    const members = [...new Set([...model.get("selected"), name])];
    const supernodes = { ...model.get("supernodes") };
    let label = naming.value.trim();
    if (!label || label in supernodes) {
      let index = Object.keys(supernodes).length + 1;
      while (`supernode ${index}` in supernodes) index += 1;
      label = label ? `${label} ${index}` : `supernode ${index}`;
    }
    supernodes[label] = members;
    naming.value = "";
    model.set("supernodes", supernodes);
    model.set("selected", []);
    model.save_changes();
  }

  function paint() {
    const selected = new Set(model.get("selected"));
    for (const [name, shape] of Object.entries(circles)) {
      shape.setAttribute("stroke", selected.has(name) ? "#f59e0b" : "none");
      shape.setAttribute("stroke-width", selected.has(name) ? 3 : 0);
    }
    boxLayer.replaceChildren();
    for (const [label, members] of Object.entries(model.get("supernodes"))) {
      const nodes = members.map(m => byName[m]).filter(Boolean);
      if (!nodes.length) continue;
      const xs = nodes.map(n => n.x), ys = nodes.map(n => n.y);
      const x = Math.min(...xs) - 8, y = Math.min(...ys) - 8;
      make("rect", { x, y, width: Math.max(...xs) - x + 8, height: Math.max(...ys) - y + 8, rx: 4,
                     fill: "#fde68a", "fill-opacity": 0.35, stroke: "#d97706" }, boxLayer);
      const text = make("text", { x, y: y - 2, fill: "#92400e", class: "mechnb-graph-supernode" }, boxLayer);
      text.textContent = label;
      text.style.cursor = "pointer";
      text.addEventListener("click", () => { model.set("selected", members); model.save_changes(); });
    }
  }
  model.on("change:selected", paint);
  model.on("change:supernodes", paint);
  paint();
  return () => { model.off("change:selected", paint); model.off("change:supernodes", paint); };
}

export default { render };
