// Compose: saves the form as a draft a few seconds after each change and when the page is
// left (POST /compose/draft, with the form's CSRF token).  Files are not sent this way: they
// are stored by Send or Save draft.  Without this script, "Save draft" does the same.
(function () {
  "use strict";
  var form = document.querySelector("form.compose[data-autosave]");
  var status = document.getElementById("draft-status");
  if (!form || !status || !window.fetch || !window.FormData) { return; }
  var url = form.getAttribute("data-autosave");
  // ms from the first unsaved change: inside the 10 s the page promises, and rare enough
  // that a draft with big attachments is not rewritten every moment while someone types.
  var DELAY = 5000;
  var timer = null, dirty = false, busy = false, submitting = false;

  function data() {
    var fd = new FormData(form);
    fd.delete("attachments");
    fd.delete("action");
    return fd;
  }

  function saved(reply) {
    if (reply && reply.id) {
      form.elements.saved.value = reply.id;
      // The words come from the page (data-msg-*), in its language.
      status.textContent = status.getAttribute("data-msg-saved") || "Draft saved";
    }
  }

  function save() {
    timer = null;
    if (busy || submitting) { return; }
    busy = true;
    dirty = false;
    fetch(url, { method: "POST", body: data(), credentials: "same-origin" })
      .then(function (resp) { return resp.ok ? resp.json() : null; })
      .then(saved, function () {
        status.textContent = status.getAttribute("data-msg-unsaved") || "Draft not saved: no connection";
      })
      .then(function () { busy = false; if (dirty) { later(); } });
  }

  function later() {
    dirty = true;
    if (timer === null) { timer = window.setTimeout(save, DELAY); }
  }

  function leave() {
    if (!dirty || submitting) { return; }
    dirty = false;
    if (navigator.sendBeacon) { navigator.sendBeacon(url, data()); }
    else { fetch(url, { method: "POST", body: data(), credentials: "same-origin", keepalive: true }); }
  }

  form.addEventListener("input", later);
  form.addEventListener("change", later);
  form.addEventListener("submit", function () {
    submitting = true;
    if (timer !== null) { window.clearTimeout(timer); timer = null; }
  });
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") { leave(); }
  });
  window.addEventListener("pagehide", leave);
})();
