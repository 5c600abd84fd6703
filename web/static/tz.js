// Tells the webmail the browser's time zone, so its pages show times the reader's way.
// The zone goes into the "tz" session cookie (nothing secret: a zone name); the server
// checks it against its zone database and ignores a name it does not know.  A page that
// was shown in another zone and has times on it is reloaded once (GET pages only, so no
// form is ever sent twice); without this script the pages say their times are UTC.
(function () {
  "use strict";
  var zone;
  try {
    zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  } catch (e) {
    return;
  }
  if (!zone || !/^[A-Za-z0-9_+\-\/]{1,64}$/.test(zone)) return;
  var secure = location.protocol === "https:" ? "; Secure" : "";
  // The checked characters are all allowed in a cookie as they are (no encoding to undo).
  document.cookie = "tz=" + zone + "; Path=/; SameSite=Lax" + secure;
  var meta = document.querySelector('meta[name="fallback-tz"]');
  if (!meta || meta.content === zone || meta.getAttribute("data-reload") !== "1") return;
  if (!document.querySelector("time[datetime]")) return;
  // At most once per zone and tab: a zone the server refuses must not reload for ever.
  var key = "fallback-tz-reloaded";
  try {
    if (sessionStorage.getItem(key) === zone) return;
    sessionStorage.setItem(key, zone);
  } catch (e) {
    return;
  }
  if (document.cookie.indexOf("tz=" + zone) === -1) return;  // cookies off
  location.reload();
})();
