// Address suggestions in compose: fills each To/Cc/Bcc field's <datalist> from GET /contacts
// as the user types (debounced).  The browser's own datalist popup does the rest, keyboard
// included (arrow keys, Enter).  Without this script the fields are plain text inputs.
(function () {
  "use strict";
  var form = document.querySelector("form.compose");
  if (!form || !window.fetch || !form.dataset.suggest) { return; }
  var url = form.dataset.suggest;
  var WAIT = 200;  // ms after the last key before asking: a normal typist asks a few times a word

  // The piece being typed: what follows the last comma or semicolon.
  function current(value) {
    var parts = value.split(/[,;]/);
    return parts[parts.length - 1].trim();
  }

  function label(entry) {
    return entry.name ? entry.name + " <" + entry.address + ">" : entry.address;
  }

  function fill(input, list, entries) {
    var value = input.value;
    var cut = Math.max(value.lastIndexOf(","), value.lastIndexOf(";"));
    var head = cut >= 0 ? value.slice(0, cut + 1) + " " : "";
    while (list.firstChild) { list.removeChild(list.firstChild); }
    entries.forEach(function (entry) {
      var option = document.createElement("option");
      // The whole field's value: choosing a suggestion keeps the addresses typed before it.
      option.value = head + label(entry);
      list.appendChild(option);
    });
  }

  Array.prototype.forEach.call(form.querySelectorAll("input[list]"), function (input) {
    var list = document.getElementById(input.getAttribute("list"));
    if (!list) { return; }
    var timer = null;
    var asked = "";
    input.addEventListener("input", function () {
      if (timer) { clearTimeout(timer); }
      timer = setTimeout(function () {
        var q = current(input.value).slice(0, 100);
        if (q === asked) { return; }
        asked = q;
        if (!q || q.indexOf("<") >= 0) { fill(input, list, []); return; }
        fetch(url + "?q=" + encodeURIComponent(q), { credentials: "same-origin" })
          .then(function (response) { return response.ok ? response.json() : []; })
          .then(function (entries) {
            if (asked === q && Array.isArray(entries)) { fill(input, list, entries); }
          })
          .catch(function () { /* no suggestions: the field still takes any address */ });
      }, WAIT);
    });
  });
})();
