// imgproc dashboard: plain JavaScript over the JSON API (no build step).
// Every value from the API is put into the page as text (textContent), never as HTML.

const TERMINAL = new Set(["completed", "completed_with_errors", "failed"]);
const PAGE_SIZE = 50;
const KEY_STORE = "imgproc.apiKey";

const $ = (id) => document.getElementById(id);

class ApiFailure extends Error {
  constructor(status, error) {
    super(error.message);
    this.status = status;
    this.code = error.code;
    this.details = error.details || [];
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers.set("X-API-Key", key);
  let reply;
  try {
    reply = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiFailure(0, { code: "network", message: "The service cannot be reached. Is it running?" });
  }
  let body = null;
  try {
    body = await reply.json();
  } catch (err) {
    body = null;
  }
  if (!reply.ok) {
    const error = (body && body.error) || { code: "http_" + reply.status, message: `HTTP ${reply.status}` };
    if (reply.status === 401) showKeyForm();
    throw new ApiFailure(reply.status, error);
  }
  return body;
}

// ---- formatting ---------------------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB"];
  let value = n;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value >= 100 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

function saving(input, output) {
  if (!input) return "";
  const pct = Math.round((100 * (input - output)) / input);
  return pct >= 0 ? `−${pct}%` : `+${-pct}%`;
}

function ago(iso) {
  if (!iso) return "";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return "just now";
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return new Date(iso).toLocaleString();
}

function label(status) {
  return status.replaceAll("_", " ");
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function badge(status) {
  return el("span", { class: `badge ${status}`, text: label(status), "data-status": status });
}

function progressBar(progress, status) {
  const bar = el("div", { class: `bar ${status}`, role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" });
  bar.style.width = `${progress.percent}%`;
  bar.setAttribute("aria-valuenow", String(progress.percent));
  return el("div", { class: "progress" }, bar);
}

function counts(progress) {
  const failed = progress.images_failed ? `, ${progress.images_failed} failed` : "";
  return `${progress.images_done + progress.images_failed} of ${progress.images_total} images${failed} · ${progress.products_total} products`;
}

// ---- API key ------------------------------------------------------------------------------

function showKeyForm() {
  $("key-form").hidden = false;
  $("api-key").focus();
}

function setUpKeyForm() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("key-button").addEventListener("click", () => {
    $("key-form").hidden = !$("key-form").hidden;
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
    $("key-form").hidden = true;
    route();
  });
}

// ---- errors -------------------------------------------------------------------------------

function showError(box, failure) {
  box.replaceChildren(el("strong", { text: failure.message }));
  if (failure.details.length) {
    const rows = failure.details.map((d) =>
      el(
        "tr",
        {},
        el("td", { text: d.row ?? "" }),
        el("td", { text: d.column ?? d.field ?? "" }),
        el("td", { text: d.message }),
      ),
    );
    const head = el("tr", {}, el("th", { text: "Row" }), el("th", { text: "Column" }), el("th", { text: "Problem" }));
    box.append(el("table", { class: "error-details" }, el("thead", {}, head), el("tbody", {}, ...rows)));
  }
  box.hidden = false;
}

// ---- upload -------------------------------------------------------------------------------

function setUpUpload() {
  const form = $("upload-form");
  const file = $("file");
  const drop = $("drop");
  const quality = $("quality");
  quality.addEventListener("input", () => {
    $("quality-value").textContent = quality.value;
  });
  const chose = () => {
    const chosen = file.files[0];
    $("file-label").textContent = chosen ? `${chosen.name} · ${bytes(chosen.size)}` : "Choose a CSV or .xlsx, or drop it here";
    drop.classList.toggle("chosen", Boolean(chosen));
  };
  file.addEventListener("change", chose);
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) {
      file.files = event.dataTransfer.files;
      chose();
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const box = $("upload-error");
    box.hidden = true;
    if (!file.files[0]) {
      showError(box, new ApiFailure(0, { code: "missing_file", message: "Choose a CSV file first." }));
      return;
    }
    const data = new FormData();
    data.append("file", file.files[0]);
    const webhook = $("webhook_url").value.trim();
    if (webhook) data.append("webhook_url", webhook);
    data.append("quality", quality.value);
    data.append("output_format", $("output_format").value);
    const button = $("upload-button");
    button.disabled = true;
    button.textContent = "Uploading…";
    try {
      const created = await api("/csv/upload", { method: "POST", body: data });
      form.reset();
      $("quality-value").textContent = quality.value;
      chose();
      location.hash = `#/requests/${created.request_id}`;
    } catch (failure) {
      showError(box, failure);
    } finally {
      button.disabled = false;
      button.textContent = "Upload";
    }
  });
}

// ---- recent requests ----------------------------------------------------------------------

let recentTimer = null;
let olderCursor = null;

function recentItem(request) {
  const link = el(
    "a",
    { href: `#/requests/${request.request_id}`, "data-request-id": request.request_id },
    el("span", { class: "rid", text: request.request_id }),
    badge(request.status),
    progressBar(request.progress, request.status),
    el("span", { class: "counts", text: `${counts(request.progress)} · ${ago(request.created_at)}` }),
  );
  return el("li", {}, link);
}

async function loadRecent() {
  clearTimeout(recentTimer);
  try {
    const page = await api("/csv/requests?limit=20");
    $("recent").replaceChildren(...page.requests.map(recentItem));
    $("recent-empty").hidden = page.requests.length > 0;
    olderCursor = page.next;
    $("recent-more").hidden = !olderCursor;
    const active = page.requests.some((r) => !TERMINAL.has(r.status));
    $("recent-note").textContent = active ? "updating live" : "";
    recentTimer = setTimeout(loadRecent, active ? 1500 : 10000);
  } catch (failure) {
    $("recent-note").textContent = failure.message;
    recentTimer = setTimeout(loadRecent, 5000);
  }
}

async function loadOlder() {
  if (!olderCursor) return;
  const page = await api(`/csv/requests?limit=20&before=${encodeURIComponent(olderCursor)}`);
  $("recent").append(...page.requests.map(recentItem));
  olderCursor = page.next;
  $("recent-more").hidden = !olderCursor;
}

// ---- one request --------------------------------------------------------------------------

let requestTimer = null;
let shown = { id: null, offset: 0, rendered: "" };

function fact(name, value, cls = "") {
  return el("div", {}, el("dt", { text: name }), el("dd", { class: cls, text: value }));
}

function imageRow(image) {
  const row = document.getElementById("image-template").content.firstElementChild.cloneNode(true);
  row.classList.add(image.status);
  row.dataset.status = image.status;
  const [beforeImg, afterImg] = row.querySelectorAll("img");
  const [beforeCap, afterCap] = row.querySelectorAll("figcaption");
  const beforeThumb = row.querySelector(".before .thumb");
  beforeImg.addEventListener("error", () => {
    beforeThumb.replaceChildren(el("span", { text: "cannot be shown here" }));
    beforeThumb.classList.add("empty");
  });
  beforeImg.src = image.input_url;
  beforeImg.alt = "input image";
  beforeCap.append(el("b", { text: bytes(image.input_bytes) }), ` · ${image.input_url}`);
  const afterThumb = row.querySelector(".after .thumb");
  if (image.status === "done") {
    afterImg.src = image.output_url;
    afterImg.alt = "compressed image";
    afterCap.append(
      el("b", { text: bytes(image.output_bytes) }),
      ` · ${image.width}×${image.height} ${image.format} `,
      el("span", { class: "saving", text: saving(image.input_bytes, image.output_bytes) }),
    );
    if (image.kept_original) afterCap.append(" · original kept (already smaller)");
  } else if (image.status === "failed") {
    afterThumb.replaceChildren(el("span", { text: "failed" }));
    afterThumb.classList.add("empty");
    afterCap.append(el("span", { class: "reason", text: image.error || "failed" }));
  } else {
    afterThumb.replaceChildren(el("span", { text: image.status === "processing" ? "processing…" : "waiting…" }));
    afterThumb.classList.add("empty");
  }
  return row;
}

function productCard(product) {
  const head = el(
    "div",
    { class: "product-head" },
    el("h3", {}, el("span", { class: "serial", text: `#${product.serial_number}` }), product.product_name),
    badge(product.status),
  );
  const images = el("ol", { class: "images" }, ...product.images.map(imageRow));
  return el("li", { class: "product", "data-serial": String(product.serial_number) }, head, images);
}

function renderRequest(body) {
  $("req-id").textContent = body.request_id;
  const status = $("req-status");
  status.className = `badge ${body.status}`;
  status.textContent = label(body.status);
  status.dataset.status = body.status;
  const bar = $("req-bar");
  bar.className = `bar ${body.status}`;
  bar.style.width = `${body.progress.percent}%`;
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuenow", String(body.progress.percent));

  const done = body.products.flatMap((p) => p.images).filter((i) => i.status === "done");
  const inBytes = done.reduce((sum, i) => sum + i.input_bytes, 0);
  const outBytes = done.reduce((sum, i) => sum + i.output_bytes, 0);
  const whole = body.products_page.total <= body.products.length;
  const facts = [
    fact("Progress", `${body.progress.percent}%`),
    fact("Images done", String(body.progress.images_done)),
    fact("Images failed", String(body.progress.images_failed), body.progress.images_failed ? "reason" : ""),
    fact("Products", String(body.progress.products_total)),
    fact(whole ? "Size before → after" : "Size (this page)", `${bytes(inBytes)} → ${bytes(outBytes)}`),
    fact(whole ? "Saved" : "Saved (this page)", inBytes ? `${bytes(inBytes - outBytes)} (${saving(inBytes, outBytes)})` : "–", "saving"),
    fact("Webhook", body.webhook.url ? label(body.webhook.status) : "none"),
  ];
  $("req-facts").replaceChildren(...facts);

  const csv = $("req-csv");
  csv.href = body.output_csv_url;
  const ready = TERMINAL.has(body.status);
  csv.classList.toggle("disabled", !ready);
  csv.setAttribute("aria-disabled", String(!ready));
  csv.title = ready ? "" : "Ready when the request has finished";
  $("req-json").href = `/csv/status/${body.request_id}?offset=${shown.offset}&limit=${PAGE_SIZE}`;

  const page = body.products_page;
  $("page-note").textContent = page.total
    ? `${page.offset + 1}–${page.offset + body.products.length} of ${page.total}`
    : "";
  $("prev-page").disabled = page.offset === 0;
  $("next-page").disabled = page.offset + body.products.length >= page.total;
  $("products").replaceChildren(...body.products.map(productCard));
}

async function loadRequest() {
  clearTimeout(requestTimer);
  const id = shown.id;
  try {
    const body = await api(`/csv/status/${encodeURIComponent(id)}?offset=${shown.offset}&limit=${PAGE_SIZE}`);
    if (id !== shown.id) return;
    $("req-error").hidden = true;
    const rendered = JSON.stringify(body);
    if (rendered !== shown.rendered) {
      shown.rendered = rendered;
      renderRequest(body);
    }
    if (!TERMINAL.has(body.status)) requestTimer = setTimeout(loadRequest, 1000);
  } catch (failure) {
    showError($("req-error"), failure);
    if (failure.status === 0 || failure.status >= 500) requestTimer = setTimeout(loadRequest, 3000);
  }
}

// ---- routing ------------------------------------------------------------------------------

function route() {
  clearTimeout(recentTimer);
  clearTimeout(requestTimer);
  const match = location.hash.match(/^#\/requests\/([^/?]+)/);
  $("home-view").hidden = Boolean(match);
  $("request-view").hidden = !match;
  if (match) {
    const id = decodeURIComponent(match[1]);
    if (id !== shown.id) shown = { id, offset: 0, rendered: "" };
    document.title = `imgproc · ${id}`;
    loadRequest();
  } else {
    document.title = "imgproc";
    loadRecent();
  }
}

function setUpPager() {
  $("prev-page").addEventListener("click", () => {
    shown.offset = Math.max(0, shown.offset - PAGE_SIZE);
    shown.rendered = "";
    loadRequest();
  });
  $("next-page").addEventListener("click", () => {
    shown.offset += PAGE_SIZE;
    shown.rendered = "";
    loadRequest();
  });
}

setUpKeyForm();
setUpUpload();
setUpPager();
$("recent-more").addEventListener("click", loadOlder);
window.addEventListener("hashchange", route);
route();
