// Keyboard shortcuts for the mailbox pages: c compose, / search, j/k next/previous message,
// o or Enter open, r reply, a reply all, f forward, # delete, ? this list (Escape closes it).
// Targets are marked in the templates with data-key-* attributes; a key whose target is not
// on the page does nothing.  Never active while typing in a field, nor with Ctrl/Alt/Meta.
// Without this script every action is still a link or a button.
(function () {
  "use strict";

  function typing(el) {
    if (!el) return false;
    var tag = el.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || el.isContentEditable;
  }

  function rows() {
    return Array.prototype.slice.call(document.querySelectorAll("[data-row]"));
  }

  function current() {
    return document.querySelector("[data-row].selected");
  }

  function select(row) {
    var old = current();
    if (old) old.classList.remove("selected");
    row.classList.add("selected");
    var link = row.querySelector("[data-open]");
    if (link) link.focus();
  }

  function move(step) {
    var all = rows();
    if (!all.length) return;
    var active = document.activeElement && document.activeElement.closest("[data-row]");
    var at = all.indexOf(active || current());
    var next = at === -1 ? (step > 0 ? 0 : all.length - 1) : Math.min(all.length - 1, Math.max(0, at + step));
    select(all[next]);
  }

  function follow(selector) {
    var link = document.querySelector(selector);
    if (link && link.href) {
      location.assign(link.href);
      return true;
    }
    return false;
  }

  function csrf() {
    var field = document.querySelector('input[name="csrf_token"]');
    return field ? field.value : "";
  }

  // The same POST the Delete button sends, with the session's CSRF token.
  function deleteRow(row) {
    var form = document.createElement("form");
    form.method = "post";
    form.action = row.getAttribute("data-delete");
    [["csrf_token", csrf()], ["next", location.pathname + location.search]].forEach(function (pair) {
      var input = document.createElement("input");
      input.type = "hidden";
      input.name = pair[0];
      input.value = pair[1];
      form.appendChild(input);
    });
    document.body.appendChild(form);
    form.submit();
  }

  function remove() {
    var form = document.querySelector("form[data-key-delete]");
    if (form) {
      form.requestSubmit();
      return true;
    }
    var row = current() || (document.activeElement && document.activeElement.closest("[data-row]"));
    if (row && row.hasAttribute("data-delete")) {
      deleteRow(row);
      return true;
    }
    return false;
  }

  function open() {
    var row = current() || (document.activeElement && document.activeElement.closest("[data-row]"));
    var link = row && row.querySelector("[data-open]");
    if (!link) return false;
    location.assign(link.href);
    return true;
  }

  function help() {
    var dialog = document.getElementById("keys-help");
    if (!dialog || dialog.open || typeof dialog.showModal !== "function") return false;
    dialog.showModal();  // a modal <dialog>: focus moves in, Escape closes it, focus returns
    return true;
  }

  var actions = {
    "c": function () { return follow("[data-key-compose]"); },
    "/": function () {
      var field = document.querySelector("[data-key-search]");
      if (!field) return false;
      field.focus();
      field.select();
      return true;
    },
    "j": function () { move(1); return true; },
    "k": function () { move(-1); return true; },
    "o": open,
    "r": function () { return follow("[data-key-reply]"); },
    "a": function () { return follow("[data-key-replyall]"); },
    "f": function () { return follow("[data-key-forward]"); },
    "#": remove,
    "?": help
  };

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.altKey || event.metaKey || event.defaultPrevented) return;
    if (typing(event.target) || document.querySelector("dialog[open]")) return;
    if (event.key === "Enter") {
      // A focused link opens itself; Enter on a selected row that lost focus opens it too.
      if (event.target.closest && event.target.closest("a, button")) return;
      if (open()) event.preventDefault();
      return;
    }
    var action = actions[event.key];
    if (action && action()) event.preventDefault();
  });

  document.addEventListener("click", function (event) {
    var close = event.target.closest && event.target.closest("[data-keys-close]");
    if (close) close.closest("dialog").close();
  });
})();
