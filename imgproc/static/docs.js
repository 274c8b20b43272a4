// Starts Swagger UI over /openapi.json (served by this service, as is every file of the page).
// With API keys on, the key the dashboard keeps in this browser, or one typed here, goes with
// every request as X-API-Key; Swagger UI's "Authorize" can set another.
const KEY_STORE = "imgproc.apiKey"; // the dashboard's
const $ = (id) => document.getElementById(id);
const storedKey = () => localStorage.getItem(KEY_STORE) || "";

async function loadSpec() {
  const headers = { Accept: "application/json" };
  if (storedKey()) headers["X-API-Key"] = storedKey();
  const reply = await fetch("/openapi.json", { headers });
  if (reply.status === 401) return null;
  if (!reply.ok) throw new Error(`/openapi.json answered ${reply.status}`);
  return reply.json();
}

function sendKey(request) {
  const key = storedKey();
  if (key && !request.headers["X-API-Key"] && !request.headers.Authorization) {
    request.headers["X-API-Key"] = key;
  }
  return request;
}

async function start() {
  let spec;
  try {
    spec = await loadSpec();
  } catch (error) {
    $("load-error").textContent = `The API document could not be loaded: ${error.message}`;
    $("load-error").hidden = false;
    return;
  }
  if (spec === null) {
    $("key-form").hidden = false;
    $("api-key").focus();
    return;
  }
  $("key-form").hidden = true;
  $("load-error").hidden = true;
  spec.servers = [{ url: window.location.origin }]; // "Try it out" calls this service
  const ui = window.SwaggerUIBundle({
    spec,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null, // no badge fetched from an outside validator
    requestInterceptor: sendKey,
  });
  if (storedKey()) ui.preauthorizeApiKey("ApiKey", storedKey());
  window.ui = ui;
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_STORE, $("api-key").value.trim());
  start();
});

start();
