/* cancelflow support dashboard. No build step, no dependencies.
 *
 * The list (/) reads GET /requests, the request page (/ui/requests/{id}) GET /requests/{id}; both
 * follow GET /events (one `status` event per record on cancellations.status) and update in place.
 * Data is written with textContent only.
 */
"use strict";

const OPEN_STATES = ["received", "pending_approval", "in_progress", "scheduled"];
const VIEWS = {  // the "Show" filter -> the state query
  all: [], open: OPEN_STATES, failed: ["failed"], manual_review: ["manual_review"],
  completed: ["completed"], rejected: ["rejected", "declined"],
};
const STATE_NAMES = {
  received: "Received", pending_approval: "Pending approval", in_progress: "In progress", scheduled: "Scheduled",
  completed: "Completed", failed: "Failed", rejected: "Rejected", manual_review: "Manual review", declined: "Declined",
};
const SOURCE_LABELS = {
  vendor: "Vendor error", platform: "Platform error", payment: "Payment error",
  validation: "Rejected", notification: "Email problem",
};
const PAGE_SIZE = 25;

/* --- helpers ------------------------------------------------------------------------------- */

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function badge(state) {
  return el("span", { className: `badge ${state}`, text: STATE_NAMES[state] || state });
}

// A finished request someone acted on keeps its state (CONTRACT.md sections 6 and 11); this says who
// resolved it and how, e.g. the system, when a request set aside as stuck completed after all.
function resolutionText(resolution) {
  if (!resolution) return "";
  const who = resolution.by === "system" ? "the system" : resolution.by;
  const what = STATE_NAMES[resolution.action] || resolution.action.replace("_", " ");
  return `${what}: resolved by ${who}`;
}

function resolved(status) {
  if (!status.resolution) return null;
  return el("span", { className: `badge resolved ${status.resolution.action}`, text: resolutionText(status.resolution) });
}

function shortId(id) { return id.slice(0, 8); }

function age(since) {
  const seconds = Math.max(0, (Date.now() - Date.parse(since)) / 1000);
  if (seconds < 60) return `${Math.floor(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
  return `${Math.floor(seconds / 86400)} d`;
}

function when(iso) {
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

function createdAt(status) {
  return status.created_at || (status.history[0] && status.history[0].at) || status.updated_at;
}

function errorText(error) {
  if (!error) return "";
  const label = error.code === "timeout" ? "No progress" : (SOURCE_LABELS[error.source] || "Error");
  return `${label}: ${error.code}`;
}

function announce(text) {
  const region = document.getElementById("announcer");
  region.textContent = "";
  window.setTimeout(() => { region.textContent = text; }, 50);
}

/* --- signing in (CONTRACT.md section 11) -------------------------------------------------------
 * The token is asked once per browser session (the sign-in page) and kept in sessionStorage: API calls
 * send it as `Authorization: Bearer`; page loads and the live feed use the HttpOnly session cookie
 * that signing in set. An action always sends the header (the cookie alone cannot act). */

const TOKEN_KEY = "cancelflow-token";

function takeTokenFromLink() {
  const token = new URLSearchParams(window.location.hash.slice(1)).get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function signedOut() {  // the session ended (or the token was changed): sign in again
  sessionStorage.removeItem(TOKEN_KEY);
  window.location.reload();
}

async function getJSON(url) {
  const response = await fetch(url, { headers: { Accept: "application/json", ...authHeaders() } });
  if (response.status === 401) { signedOut(); throw new Error("signed out"); }
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

async function postJSON(url, body) {
  const response = await fetch(url, {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", Accept: "application/json", ...authHeaders() },
  });
  const answer = await response.json().catch(() => ({}));
  return { status: response.status, answer };
}

let operator = { name: "", role: "viewer", may_act: false };

async function whoAmI() {
  operator = (await getJSON("/session")) || operator;
  const who = document.getElementById("who");
  if (!who) return operator;
  who.replaceChildren(
    el("span", { text: `Signed in as ${operator.name} (${operator.role})` }), " ",
    el("button", { type: "button", className: "link", id: "sign-out", text: "Sign out" }));
  document.getElementById("sign-out").addEventListener("click", async () => {
    await fetch("/session", { method: "DELETE" });
    signedOut();
  });
  return operator;
}

function requestLink(id) {
  return el("a", { href: `/ui/requests/${id}` }, el("code", { text: shortId(id) }));
}

function follow(onStatus, onReconnect) {
  const connection = document.getElementById("connection");
  const source = new EventSource("/events");
  let interrupted = false;
  source.addEventListener("open", () => {
    connection.textContent = "Live: updates appear as they happen";
    connection.classList.add("live");
    if (interrupted) onReconnect();  // what changed meanwhile was not streamed: read it again
    interrupted = false;
  });
  source.addEventListener("error", () => {
    interrupted = true;
    connection.textContent = "Live feed interrupted; reconnecting…";
    connection.classList.remove("live");
  });
  source.addEventListener("status", (event) => onStatus(JSON.parse(event.data)));
  return source;
}

/* --- the list ------------------------------------------------------------------------------ */

function listPage() {
  const form = document.getElementById("filters");
  const rows = document.getElementById("rows");
  const summary = document.getElementById("summary");
  const known = new Map();  // request_id -> the version shown
  let offset = 0;
  let total = 0;

  function filters() {
    const data = new FormData(form);
    return {
      view: data.get("view") || "all",
      account_id: (data.get("account_id") || "").trim(),
      subscription_id: (data.get("subscription_id") || "").trim(),
    };
  }

  function matches(status) {
    const f = filters();
    const states = VIEWS[f.view];
    return (!states.length || states.includes(status.state))
      && (!f.account_id || status.account_id === f.account_id)
      && (!f.subscription_id || status.subscription_id === f.subscription_id);
  }

  function row(status) {
    const link = el("a", { href: `/ui/requests/${status.request_id}`, "aria-label": `Request ${status.request_id}` },
      el("code", { text: shortId(status.request_id) }));
    const tr = el("tr", { dataset: { requestId: status.request_id, state: status.state } },
      el("td", {}, link),
      el("td", { className: "state" }, badge(status.state), ...(status.resolution ? [" ", resolved(status)] : [])),
      el("td", { className: "stage", text: status.stage || "" }),
      el("td", { text: status.subscription_id || (status.charge_ids || []).join(", ") }),
      el("td", { text: status.account_id || "" }),
      el("td", { className: "age", dataset: { since: createdAt(status) }, text: age(createdAt(status)) }),
      el("td", { className: "error", text: errorText(status.error) }));
    known.set(status.request_id, status.version);
    return tr;
  }

  function describe() {
    if (!total) { summary.textContent = "No requests match."; return; }
    const last = Math.min(offset + rows.children.length, total);
    summary.textContent = `Showing ${offset + 1}–${last} of ${total} request${total === 1 ? "" : "s"}.`;
    document.getElementById("page-info").textContent = `Page ${Math.floor(offset / PAGE_SIZE) + 1} of ${Math.max(1, Math.ceil(total / PAGE_SIZE))}`;
    document.getElementById("newer").disabled = offset === 0;
    document.getElementById("older").disabled = offset + PAGE_SIZE >= total;
  }

  async function load() {
    const f = filters();
    const query = new URLSearchParams({ limit: PAGE_SIZE, offset });
    if (VIEWS[f.view].length) query.set("state", VIEWS[f.view].join(","));
    if (f.account_id) query.set("account_id", f.account_id);
    if (f.subscription_id) query.set("subscription_id", f.subscription_id);
    const page = await getJSON(`/requests?${query}`);
    known.clear();
    rows.replaceChildren(...page.items.map(row));
    total = page.total;
    describe();
  }

  function onStatus(status) {
    const shown = rows.querySelector(`tr[data-request-id="${CSS.escape(status.request_id)}"]`);
    if (shown && known.get(status.request_id) >= status.version) return;  // old news or a copy
    if (shown && !matches(status)) {
      shown.remove();
      known.delete(status.request_id);
      total = Math.max(0, total - 1);
      describe();
    } else if (shown) {
      const fresh = row(status);
      fresh.classList.add("changed");
      shown.replaceWith(fresh);
    } else if (matches(status) && offset === 0) {
      const fresh = row(status);
      fresh.classList.add("changed");
      rows.prepend(fresh);
      total += 1;
      if (rows.children.length > PAGE_SIZE) rows.lastElementChild.remove();
      describe();
    } else {
      return;
    }
    if (OPEN_STATES.includes(status.state) && status.version > 1) return;  // say only arrivals and outcomes
    announce(`Request ${shortId(status.request_id)}: ${STATE_NAMES[status.state] || status.state}`);
  }

  form.addEventListener("change", (event) => {
    if (event.target.name === "view") { offset = 0; load(); }
  });
  form.addEventListener("submit", (event) => { event.preventDefault(); offset = 0; load(); });
  form.addEventListener("reset", () => { window.setTimeout(() => { offset = 0; load(); }, 0); });
  document.getElementById("newer").addEventListener("click", () => { offset = Math.max(0, offset - PAGE_SIZE); load(); });
  document.getElementById("older").addEventListener("click", () => { offset += PAGE_SIZE; load(); });
  window.setInterval(() => {
    for (const cell of rows.querySelectorAll("td.age")) cell.textContent = age(cell.dataset.since);
  }, 15000);

  follow(onStatus, () => load().catch(() => {}));
  load().catch((error) => { summary.textContent = `Could not load the requests: ${error.message}`; });
  whoAmI().then((me) => { document.getElementById("on-behalf-section").hidden = !me.may_act; }).catch(() => {});
  onBehalfForm();
  auditTrail();
}

function onBehalfForm() {
  const form = document.getElementById("on-behalf");
  const outcome = document.getElementById("on-behalf-outcome");
  const mode = form.elements.mode;
  const dateField = document.getElementById("ob-date-field");
  mode.addEventListener("change", () => { dateField.hidden = mode.value !== "past_dated"; });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const body = {
      account_id: data.get("account_id").trim(), subscription_id: data.get("subscription_id").trim(),
      mode: data.get("mode"), reason: data.get("reason").trim(), opt_out_of_emails: data.get("opt_out") === "on",
    };
    if (body.mode === "past_dated") body.effective_date = data.get("effective_date");
    if (data.get("quantity")) body.quantity = Number(data.get("quantity"));
    const { status, answer } = await postJSON("/cancellations", body);
    if (status === 202) {
      outcome.replaceChildren(el("span", { text: "Cancellation requested: " }), requestLink(answer.request_id));
      outcome.className = "outcome ok";
      form.reset();
      dateField.hidden = true;
      auditTrail();
    } else {
      outcome.textContent = `Not sent (${status}): ${answer.error || "error"}`;
      outcome.className = "outcome problem";
    }
  });
}

async function auditTrail() {
  const body = document.getElementById("audit-rows");
  if (!body) return;
  const page = await getJSON("/audit?limit=20").catch(() => null);
  if (!page) return;
  body.replaceChildren(...page.items.map((a) => el("tr", { dataset: { status: String(a.status) } },
    el("td", {}, el("time", { datetime: a.at, text: when(a.at) })),
    el("td", { text: a.operator }),
    el("td", { text: a.action }),
    el("td", {}, a.request_id ? requestLink(a.request_id) : ""),
    el("td", { className: a.status === 202 ? "accepted" : "refused",
               text: a.status === 202 ? "accepted" : `${a.status}: ${a.outcome}` }),
    el("td", { text: a.note || "" }))));
}

/* --- one request --------------------------------------------------------------------------- */

function requestPage() {
  const requestId = decodeURIComponent(window.location.pathname.split("/").pop());
  let version = 0;
  document.getElementById("request-id").textContent = requestId;
  document.title = `Request ${shortId(requestId)} · cancelflow support`;

  function detail(list, term, value) {
    if (value === null || value === undefined || value === "") return;
    list.append(el("dt", { text: term }), el("dd", { text: String(value) }));
  }

  function render(doc) {
    document.getElementById("not-found").hidden = true;
    document.getElementById("request").hidden = false;
    document.getElementById("state").replaceWith(Object.assign(badge(doc.state), { id: "state" }));
    document.getElementById("stage-text").textContent = doc.stage ? `stage: ${doc.stage}` : "";
    document.getElementById("version-text").textContent = `version ${doc.version}, updated ${when(doc.updated_at)}`;

    const resolution = document.getElementById("resolution-panel");
    resolution.hidden = !doc.resolution;
    if (doc.resolution) {
      resolution.className = `resolution-panel ${doc.resolution.action}`;
      document.getElementById("resolution-title").textContent = `${resolutionText(doc.resolution)}, ${when(doc.resolution.at)}`;
      document.getElementById("resolution-note").textContent = doc.resolution.note || "";
    }

    const panel = document.getElementById("error-panel");
    panel.hidden = !doc.error;
    if (doc.error) {
      const help = doc.error_help || { label: "Error", advice: "", action: "contact_support" };
      panel.className = `error-panel ${help.action}`;
      document.getElementById("error-title").textContent = `${help.label} (${doc.error.source}, ${doc.error.code})`;
      document.getElementById("error-message").textContent = doc.error.message;
      document.getElementById("error-advice").textContent = help.advice;
    }

    const details = document.getElementById("details");
    details.replaceChildren();
    detail(details, "Account", doc.account_id);
    detail(details, "Target", doc.target);
    detail(details, "Subscription", doc.subscription_id);
    detail(details, "Charges", (doc.charge_ids || []).join(", "));
    detail(details, "Mode", doc.mode);
    detail(details, "Subscription status", doc.subscription_status);
    detail(details, "Provisioning status", doc.provisioning_status);
    detail(details, "Effective date", doc.effective_date);
    detail(details, "Access ends", doc.access_end_date);
    detail(details, "Received", when(doc.created_at));
    const links = document.getElementById("links");
    links.replaceChildren();
    if (doc.retry_of) links.append(el("li", {}, el("span", { text: "Repeats request " }), requestLink(doc.retry_of)));
    if (doc.resolution) {
      const r = doc.resolution;
      const item = el("li", { id: "resolution", text: `Resolved: ${r.action} by ${r.by}${r.note ? ` (“${r.note}”)` : ""}, ${when(r.at)}` });
      if (r.request_id) item.append(el("span", { text: "; new request " }), requestLink(r.request_id));
      links.append(item);
    }
    if (doc.subscription_id) {
      links.append(el("li", {}, el("a", { href: `/ui/subscriptions/${encodeURIComponent(doc.subscription_id)}`,
                                          text: `Subscription ${doc.subscription_id}: billing, provisioning, refunds` })));
    }
    renderActions(doc);

    document.getElementById("timeline").replaceChildren(...doc.history.map((entry) =>
      el("li", {}, el("time", { datetime: entry.at, text: when(entry.at) }), el("span", { text: entry.message }))));

    const errors = doc.errors || [];
    document.getElementById("no-errors").hidden = errors.length > 0;
    document.getElementById("errors").replaceChildren(...errors.map((e) => el("li", {},
      el("span", { className: "label", text: e.help.label }),
      el("span", { className: `action ${e.help.action}`, text: e.help.action === "retry" ? "retry is safe" : e.help.action.replace("_", " ") }),
      el("br"),
      el("time", { datetime: e.at, className: "muted", text: `${when(e.at)} · ${e.source} · ${e.code}` }),
      el("div", { text: e.message }),
      el("div", { className: "muted", text: e.help.advice }))));

    const refund = doc.refund;
    document.getElementById("refund").textContent = refund
      ? `Refund: ${refund.amount} ${refund.currency} (${refund.status.replace("_", " ")})`
      : "No refund recorded.";
    const emails = doc.emails || [];
    document.getElementById("no-emails").hidden = emails.length > 0;
    document.getElementById("emails").replaceChildren(...emails.map((m) => el("li", {},
      el("span", { text: `“${m.subject}” to ${m.audience === "customer" ? "the customer" : "support"}` }), " ",
      el("time", { datetime: m.at, className: "muted", text: when(m.at) }))));
  }

  const ACTION_LABELS = { approve: "Approve", decline: "Decline", retry: "Retry as a new request",
                          retry_refund: "Retry the refund", close: "Close the case" };

  function renderActions(doc) {
    const section = document.getElementById("actions-section");
    const buttons = document.getElementById("action-buttons");
    const actions = operator.may_act ? (doc.actions || []) : [];
    section.hidden = actions.length === 0;
    buttons.replaceChildren(...actions.map((action) => el("button", {
      type: "button", dataset: { action }, className: action === "decline" || action === "close" ? "secondary" : "",
      text: ACTION_LABELS[action] || action })));
  }

  document.getElementById("action-buttons").addEventListener("click", async (event) => {
    const action = event.target.dataset && event.target.dataset.action;
    if (!action) return;
    const note = document.getElementById("action-note").value.trim();
    const resolve = action === "retry_refund" || action === "close";
    const path = `/requests/${encodeURIComponent(requestId)}/${resolve ? "resolve" : action}`;
    const outcome = document.getElementById("action-outcome");
    for (const button of document.querySelectorAll("#action-buttons button")) button.disabled = true;
    const { status, answer } = await postJSON(path, resolve ? { action, note } : { note });
    if (status === 202) {
      outcome.className = "outcome ok";
      outcome.replaceChildren(el("span", { text: `${ACTION_LABELS[action]}: accepted.` }));
      if (answer.retry_of) outcome.append(el("span", { text: " New request: " }), requestLink(answer.request_id));
      document.getElementById("action-note").value = "";
      document.getElementById("actions-section").hidden = true;
    } else {
      outcome.className = "outcome problem";
      outcome.textContent = `${ACTION_LABELS[action]}: refused (${status}): ${answer.error || "error"}`;
      for (const button of document.querySelectorAll("#action-buttons button")) button.disabled = false;
    }
    announce(outcome.textContent);
  });

  async function refresh() {
    const doc = await getJSON(`/requests/${encodeURIComponent(requestId)}`);
    if (!doc) { document.getElementById("not-found").hidden = false; return; }
    const before = version;
    if (doc.version <= version) return;
    version = doc.version;
    render(doc);
    const outcome = doc.resolution ? ` (${resolutionText(doc.resolution)})` : "";
    if (before) announce(`Updated: ${STATE_NAMES[doc.state] || doc.state}${outcome}, version ${doc.version}`);
  }

  follow((status) => {
    if (status.request_id === requestId && status.version > version) refresh();
  }, () => refresh().catch(() => {}));
  whoAmI().catch(() => {}).then(() => refresh()).catch((error) => {
    const notice = document.getElementById("not-found");
    notice.hidden = false;
    notice.textContent = `Could not load the request: ${error.message}`;
  });
}

/* --- one subscription (from the services that own it) --------------------------------------- */

async function subscriptionPage() {
  const subscriptionId = decodeURIComponent(window.location.pathname.split("/").pop());
  document.getElementById("subscription-id").textContent = subscriptionId;
  document.title = `Subscription ${subscriptionId} · cancelflow support`;
  whoAmI().catch(() => {});
  const view = await getJSON(`/subscriptions/${encodeURIComponent(subscriptionId)}`);
  const problems = [];
  const part = (name, data) => {
    if (data.unavailable) problems.push(`${name} did not answer (${data.unavailable})`);
    if (data.unknown) problems.push(`${name} does not know this subscription`);
    return data.unavailable || data.unknown ? null : data;
  };
  const billing = part("billing", view.billing);
  const payments = part("payment-gateway", view.payments);
  const provisioning = part("provisioning", view.provisioning);
  const problem = document.getElementById("sub-problem");
  problem.hidden = !problems.length;
  problem.textContent = problems.join("; ");

  const details = document.getElementById("sub-details");
  const sub = billing ? billing.subscription : {};
  for (const [term, value] of [
    ["Status", sub.status], ["Provisioning status", sub.provisioning_status], ["Account", sub.account_id],
    ["Product", sub.product_name], ["Licenses", sub.quantity], ["Auto-renew", sub.auto_renew === undefined ? null : (sub.auto_renew ? "on" : "off")],
    ["Current period", sub.current_period_start ? `${sub.current_period_start} to ${sub.current_period_end}` : null],
    ["Effective date", sub.effective_date],
  ]) {
    if (value !== null && value !== undefined && value !== "") details.append(el("dt", { text: term }), el("dd", { text: String(value) }));
  }
  const billings = billing ? billing.billings : [];
  const scheduled = billings.filter((b) => b.status === "scheduled");
  document.getElementById("no-scheduled").textContent = scheduled.length
    ? `${scheduled.length} billing${scheduled.length === 1 ? "" : "s"} scheduled.` : "No future billing is scheduled.";
  document.getElementById("billings").replaceChildren(...billings.map((b) => el("tr", { dataset: { status: b.status } },
    el("td", { text: b.bill_on }), el("td", { text: `${b.amount} ${b.currency}` }), el("td", { text: b.status }))));

  document.getElementById("charges").replaceChildren(...(payments ? payments.charges : []).map((c) => el("tr", {},
    el("td", {}, el("code", { text: c.charge_id })), el("td", { text: when(c.captured_at) }),
    el("td", { text: `${c.amount} ${c.currency}` }), el("td", { text: c.refundable }),
    el("td", { text: `${c.period_start} to ${c.period_end}` }))));
  const refunds = payments ? payments.refunds : [];
  document.getElementById("no-refunds").hidden = refunds.length > 0;
  document.getElementById("refunds").replaceChildren(...refunds.map((r) => el("li", { dataset: { status: r.status } },
    el("span", { text: `${r.amount} ${r.currency} to ${r.charge_id}: ${r.status}${r.error ? ` (${r.error})` : ""} ` }),
    requestLink(r.request_id))));

  const operations = provisioning ? provisioning.operations : [];
  document.getElementById("no-ops").hidden = operations.length > 0;
  document.getElementById("operations").replaceChildren(...operations.map((o) => el("li", {},
    el("span", { text: `${o.operation} at ${o.vendor} (${o.current_quantity} → ${o.new_quantity}): ${o.status}${o.already_applied ? ", already applied" : ""} ` }),
    requestLink(o.request_id))));

  document.getElementById("sub-requests").replaceChildren(...view.requests.map((r) => el("li", {},
    requestLink(r.request_id), " ", badge(r.state), el("span", { className: "muted", text: ` ${r.mode || ""}, ${when(r.created_at)}` }))));
  document.getElementById("sub-history").replaceChildren(...(billing ? billing.history : []).map((h) =>
    el("li", {}, el("time", { datetime: h.at, text: when(h.at) }), el("span", { text: h.message }))));
}

takeTokenFromLink();
if (document.body.dataset.page === "list") listPage();
else if (document.body.dataset.page === "request") requestPage();
else if (document.body.dataset.page === "subscription") subscriptionPage().catch((error) => {
  const problem = document.getElementById("sub-problem");
  problem.hidden = false;
  problem.textContent = `Could not load the subscription: ${error.message}`;
});
