// Select all on this page, for the folder pages' bulk actions (web/templates/folder.html).
// Shows the "Select all" checkbox (hidden without this script), ticks or clears every row,
// and keeps itself in step with the rows (mixed when some are ticked).  Without the script
// each row's checkbox still works and the buttons still act on the ticked rows.
(function () {
  "use strict";
  var form = document.getElementById("bulk");
  if (!form) return;
  var all = form.querySelector("[data-select-all]");
  if (!all) return;
  function boxes() {
    return Array.prototype.slice.call(form.querySelectorAll('input[type=checkbox][name=ids]'));
  }
  function sync() {
    var list = boxes();
    var ticked = list.filter(function (b) { return b.checked; }).length;
    all.checked = list.length > 0 && ticked === list.length;
    all.indeterminate = ticked > 0 && ticked < list.length;
  }
  all.closest("label").hidden = false;
  all.addEventListener("change", function () {
    boxes().forEach(function (b) { b.checked = all.checked; });
    sync();
  });
  form.addEventListener("change", function (event) {
    if (event.target !== all) sync();
  });
  sync();
})();
