// The Undo page: counts the seconds down and, when they are up, says the message was sent
// and takes the button away (the server refuses a late Undo anyway).
(function () {
  "use strict";
  var status = document.getElementById("undo-status");
  var left = document.getElementById("undo-left");
  var form = document.getElementById("undo-form");
  if (!status || !left || !form) { return; }
  var end = Date.now() + 1000 * parseInt(status.getAttribute("data-left"), 10);
  var timer = window.setInterval(function () {
    var s = Math.ceil((end - Date.now()) / 1000);
    if (s > 0) { left.textContent = String(s); return; }
    window.clearInterval(timer);
    form.hidden = true;
    status.textContent = status.getAttribute("data-msg-sent") || "Your message was sent.";  // the page's language
  }, 500);
})();
