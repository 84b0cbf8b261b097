"use strict";
// The report's behaviour: tabs, node selection (side panel, forward-node and kernel links),
// search by name or number, kernel code. All data comes from the JSON block; text goes in with
// textContent only.
const data = JSON.parse(document.getElementById("graphc-data").textContent);
const panel = document.getElementById("panel");
let currentGraph = data.graphs[0].key;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.addEventListener("click", v); else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function showTab(key) {
  for (const section of document.querySelectorAll("section.tab")) section.hidden = section.id !== "tab-" + key;
  for (const button of document.querySelectorAll("nav button[data-tab]")) {
    button.classList.toggle("active", button.dataset.tab === key);
  }
  if (data.graphs.some(g => g.key === key)) currentGraph = key;
}

function graphByKey(key) { return data.graphs.find(g => g.key === key); }

function selectNode(graphKey, id, scroll) {
  const graph = graphByKey(graphKey);
  const node = graph && graph.nodes[id];
  if (!node) return false;
  showTab(graphKey);
  for (const g of document.querySelectorAll("g.node.selected")) g.classList.remove("selected");
  const shape = document.querySelector(`svg[data-graph="${graphKey}"] g.node[data-id="${id}"]`);
  if (shape) {
    shape.classList.add("selected");
    if (scroll) shape.scrollIntoView({block: "center", inline: "center"});
  }
  panel.replaceChildren(nodeDetails(graphKey, node));
  return true;
}

function nodeDetails(graphKey, node) {
  const box = el("div", {class: "details", "data-node": String(node.id)});
  box.append(el("h3", {}, `%${node.id} ${node.text}`));
  const rows = [["type", node.type], ["kind", node.kind], ["line", node.site]];
  if (node.name) rows.push(["name", node.name]);
  const table = el("table", {});
  for (const [k, v] of rows) table.append(el("tr", {}, el("th", {}, k), el("td", {}, v)));
  box.append(table);
  if (node.forward !== null) {
    const link = el("a", {href: "#", class: "forward-link",
                          onclick: e => { e.preventDefault(); selectNode(graphKey, node.forward, true); }},
                    node.forward_text);
    box.append(el("p", {class: "forward"}, "gradient of ", link));
    box.append(el("p", {class: "rule"}, "rule: ", el("code", {}, node.rule)));
  }
  if (node.kernels.length) {
    const list = el("p", {class: "kernels"}, "computed by ");
    for (const k of node.kernels) {
      const kernel = data.kernels[k];
      list.append(el("a", {href: "#", onclick: e => { e.preventDefault(); showKernel(k); }}, `k${k} ${kernel.label}`), " ");
    }
    box.append(list);
    box.append(kernelCode(node.kernels[0]));
  } else if (["forward", "backward", "update"].includes(node.kind)) {
    box.append(el("p", {class: "note"}, "no kernel of its own: folded into a neighbour or removed by the optimizer"));
  }
  return box;
}

function kernelCode(k) {
  const kernel = data.kernels[k];
  const box = el("div", {class: "kernel-code", "data-kernel": String(k)});
  box.append(el("h4", {}, `k${k} ${kernel.label}, writing optimized node %${kernel.node}`));
  if (kernel.code_of !== k) box.append(el("p", {class: "note"}, `the same code as k${kernel.code_of}: generated once, called by both`));
  const facts = [`${fmt(kernel.flops)} FLOP`, `${fmt(kernel.bytes)} B`];
  if (kernel.us !== undefined) facts.push(`${kernel.us.toFixed(1)} µs`, `${kernel.gflops.toFixed(1)} GFLOP/s`,
                                           `${kernel.gbs.toFixed(1)} GB/s`);
  if (kernel.peak !== undefined && kernel.peak !== null) facts.push(`${kernel.peak.toFixed(1)}% of GEMM peak`);
  box.append(el("p", {}, facts.join(" · ")));
  for (const [title, source] of [["LLVM IR", data.ir], ["assembly", data.asm]]) {
    const names = kernel.functions.concat(kernel.helpers);
    const text = names.filter(n => source[n] !== undefined).map(n => source[n]).join("\n\n");
    const details = el("details", {class: title === "LLVM IR" ? "ir" : "asm"});
    details.append(el("summary", {}, `${title} (${names.length} functions)`), el("pre", {}, text));
    if (title === "LLVM IR") details.open = true;
    box.append(details);
  }
  return box;
}

function showKernel(k) {
  panel.replaceChildren(kernelCode(k));
}

function fmt(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " G";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + " M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
  return String(n);
}

function search(text) {
  const query = text.trim();
  const status = document.getElementById("search-status");
  if (!query) { status.textContent = ""; return; }
  const number = query.match(/^%?(\d+)$/);
  const order = [currentGraph].concat(data.graphs.map(g => g.key).filter(k => k !== currentGraph));
  for (const key of order) {
    const nodes = Object.values(graphByKey(key).nodes);
    const hits = number ? nodes.filter(n => n.id === Number(number[1]))
      : nodes.filter(n => n.name.includes(query) || n.text.includes(query));
    if (hits.length) {
      selectNode(key, hits[0].id, true);
      status.textContent = `${hits.length} match${hits.length > 1 ? "es" : ""} in ${graphByKey(key).title}`;
      return;
    }
  }
  status.textContent = "no node matches";
}

for (const button of document.querySelectorAll("nav button[data-tab]")) {
  button.addEventListener("click", () => showTab(button.dataset.tab));
}
for (const svg of document.querySelectorAll("svg.graph")) {
  svg.addEventListener("click", e => {
    const shape = e.target.closest("g.node");
    if (shape) selectNode(svg.dataset.graph, Number(shape.dataset.id), false);
  });
}
for (const row of document.querySelectorAll("tr[data-kernel]")) {
  row.addEventListener("click", () => showKernel(Number(row.dataset.kernel)));
}
document.getElementById("search").addEventListener("keydown", e => {
  if (e.key === "Enter") search(e.target.value);
});
showTab("overview");
