// retrogen job gallery: fetch the job's results manifest, group images by class, filter, show provenance.
// No build step and no framework. Every value from the server is inserted with textContent, never as HTML.
"use strict";

(function () {
  const jobId = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop());
  const resultsUrl = "/v1/jobs/" + encodeURIComponent(jobId) + "/results";
  const $ = (id) => document.getElementById(id);
  let items = [];

  // An API key may come in the fragment (#key=...): fragments never reach server logs. Kept for the tab only.
  function takeKeyFromHash() {
    const key = new URLSearchParams(location.hash.slice(1)).get("key");
    if (key) { sessionStorage.setItem("retrogen-api-key", key); history.replaceState(null, "", location.pathname); }
    return !!key;
  }
  takeKeyFromHash();
  // A key pasted into an open tab changes only the fragment (no page load): take it and start over.
  window.addEventListener("hashchange", () => { if (takeKeyFromHash()) location.reload(); });
  const apiKey = sessionStorage.getItem("retrogen-api-key");
  const headers = apiKey ? { "X-API-Key": apiKey, "Authorization": "Bearer " + apiKey } : {};

  // The jobs API returns a list, or an object holding it; each item has a URL, a label and provenance.
  function normalise(json) {
    const list = Array.isArray(json) ? json : (json.items || json.data || json.results || json.images || []);
    return list.map((it) => {
      const prov = it.provenance || {};
      return {
        url: it.url || it.image_url || prov.url || "",
        label: String(it.label ?? prov.label ?? "(unlabelled)"),
        method: String(it.method ?? prov.method ?? "(unknown)"),
        provenance: prov,
      };
    });
  }

  function setStatus(text, isError) {
    $("status").textContent = text;
    $("status").classList.toggle("error", !!isError);
  }

  function fillSelect(select, values) {
    for (const v of [...new Set(values)].sort()) {
      const opt = document.createElement("option");
      opt.value = v;
      opt.textContent = v;
      select.appendChild(opt);
    }
  }

  async function setImage(img, url) {
    if (!apiKey) { img.src = url; return; }
    // <img> cannot send headers: fetch with the key and show a blob URL instead.
    try {
      const r = await fetch(url, { headers });
      if (r.ok) img.src = URL.createObjectURL(await r.blob());
    } catch (e) { /* leave the placeholder */ }
  }

  function render() {
    const method = $("method-filter").value;
    const cls = $("class-filter").value;
    const shown = items.filter((it) => (!method || it.method === method) && (!cls || it.label === cls));
    const groups = new Map();
    for (const it of shown) {
      if (!groups.has(it.label)) groups.set(it.label, []);
      groups.get(it.label).push(it);
    }
    const main = $("gallery");
    main.replaceChildren();
    for (const label of [...groups.keys()].sort()) {
      const section = document.createElement("section");
      section.className = "class-group";
      section.dataset.label = label;
      const h2 = document.createElement("h2");
      h2.textContent = label + " (" + groups.get(label).length + ")";
      const grid = document.createElement("div");
      grid.className = "grid";
      for (const it of groups.get(label)) grid.appendChild(figure(it));
      section.append(h2, grid);
      main.appendChild(section);
    }
    $("count").textContent = shown.length + " of " + items.length + " images";
  }

  function figure(it) {
    const fig = document.createElement("figure");
    fig.className = "item";
    fig.tabIndex = 0;
    fig.dataset.method = it.method;
    const img = document.createElement("img");
    img.alt = it.label;
    img.loading = "lazy";
    setImage(img, it.url);
    const cap = document.createElement("figcaption");
    cap.textContent = it.method;
    fig.append(img, cap);
    const open = () => showDetails(it);
    fig.addEventListener("click", open);
    fig.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    return fig;
  }

  const SUMMARY_KEYS = ["label", "method", "similarity", "rank", "caption", "source_uri", "url", "index_id",
    "sample_id", "model_id", "prompt", "seed", "num_inference_steps", "guidance_scale", "sha256", "created"];

  function showDetails(it) {
    const dl = $("details-summary");
    dl.replaceChildren();
    for (const key of SUMMARY_KEYS) {
      const v = it.provenance[key];
      if (v === undefined || v === null) continue;
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = typeof v === "object" ? JSON.stringify(v) : String(v);
      dl.append(dt, dd);
    }
    $("details-json").textContent = JSON.stringify(it.provenance, null, 2);
    setImage($("details-image"), it.url);
    $("details").hidden = false;
  }

  // An evaluation's chart beside the images: the newest evaluation that used this job, or this job itself
  // when it is an evaluation (then each arm links to its augmentation's gallery).
  function showEvaluation(evalId, summary, linkArms) {
    $("evaluation-title").textContent = "Evaluation " + evalId;
    setImage($("evaluation-chart"), "/v1/evaluations/" + encodeURIComponent(evalId) + "/report.png");
    const ul = $("evaluation-arms");
    ul.replaceChildren();
    const augs = (summary && summary.augmentations) || {};
    for (const [name, arm] of Object.entries((summary && summary.arms) || {})) {
      const li = document.createElement("li");
      li.className = "evaluation-arm";
      const acc = typeof arm.accuracy === "number" ? (100 * arm.accuracy).toFixed(1) + "%" : "–";
      const gain = arm.gain && typeof arm.gain.mean === "number"
        ? ", gain " + (100 * arm.gain.mean >= 0 ? "+" : "") + (100 * arm.gain.mean).toFixed(1) + " pts" : "";
      if (linkArms && typeof augs[name] === "string") {
        const a = document.createElement("a");
        a.href = "/gallery/" + encodeURIComponent(augs[name]);
        a.textContent = name;
        li.append(a);
      } else {
        li.append(document.createTextNode(name));
      }
      li.append(document.createTextNode(": top-1 " + acc + gain));
      ul.appendChild(li);
    }
    $("evaluation").hidden = false;
  }

  async function loadEvaluations() {
    try {
      const r = await fetch("/v1/jobs/" + encodeURIComponent(jobId) + "/evaluations", { headers });
      if (!r.ok) return;
      const list = await r.json();
      if (Array.isArray(list) && list.length) showEvaluation(String(list[0].id), list[0].summary, false);
    } catch (e) { /* no chart: the images still show */ }
  }

  async function load() {
    $("job-id").textContent = jobId;
    let r;
    try {
      r = await fetch(resultsUrl, { headers });
    } catch (e) {
      setStatus("Could not reach the server: " + e, true);
      return;
    }
    if (!r.ok) {
      let detail = "";
      try { const body = await r.json(); detail = body.detail || body.message || ""; } catch (e) { /* not JSON */ }
      setStatus("Results unavailable (HTTP " + r.status + ")" + (detail ? ": " + (typeof detail === "string" ? detail : JSON.stringify(detail)) : ""), true);
      return;
    }
    const json = await r.json();
    items = normalise(json);
    const isEvaluation = !!(json.summary && json.summary.method === "evaluation");
    if (isEvaluation) showEvaluation(jobId, json.summary, true);
    else loadEvaluations();
    fillSelect($("method-filter"), items.map((it) => it.method));
    fillSelect($("class-filter"), items.map((it) => it.label));
    setStatus(items.length ? "" : isEvaluation ? "An evaluation: its chart, and a gallery link per augmentation."
      : "This job has no images.");
    render();
  }

  $("method-filter").addEventListener("change", render);
  $("class-filter").addEventListener("change", render);
  $("close-details").addEventListener("click", () => { $("details").hidden = true; });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") $("details").hidden = true; });
  load();
})();
