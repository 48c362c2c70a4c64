// A classic (non-module) script: it runs even where the viewer's ES modules cannot load (a page
// opened from a file without the browser's permission), and says so on the page and in
// window.twinViewer.error instead of leaving it blank.
(function () {
  "use strict";
  function show(msg) {
    var box = document.getElementById("error");
    if (!box) {
      document.addEventListener("DOMContentLoaded", function () { show(msg); });
      return;
    }
    box.textContent = "The viewer cannot show this twin: " + msg;
    box.hidden = false;
    document.getElementById("status").textContent = "error";
  }
  window.addEventListener("error", function (e) {
    var el = e.target;
    if (!el || el.tagName !== "SCRIPT" || window.twinViewer) return;
    var msg = "cannot load " + (el.getAttribute("src") || "a script");
    if (location.protocol === "file:") {
      msg += ": a page opened from a file may not load its modules unless the browser allows it " +
        "(Chromium: --allow-file-access-from-files); or serve the bundle: twinstudio view BUNDLE";
    }
    window.twinViewer = { error: msg, ready: Promise.reject(new Error(msg)), frames: 0, splats: 0 };
    window.twinViewer.ready.catch(function () {});
    show(msg);
  }, true);
})();
