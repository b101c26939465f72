// The console's only script, embedded in the binary. Every page works
// without it; with it the page re-fetches itself every few seconds and
// swaps its body (kept while a fetch fails, dimmed as stale).
(function () {
  "use strict";
  var root = document.documentElement;
  var every = 1000 * (Number(root.getAttribute("data-refresh")) || 5);
  var refreshes = 0;
  root.classList.add("js");

  function schedule() {
    window.setTimeout(refresh, every);
  }

  function refresh() {
    if (document.hidden) {
      schedule();
      return;
    }
    fetch(window.location.href, { cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        return response.text().then(function (text) {
          // A 404 or 503 page replaces the body too: it says what is wrong.
          var next = new DOMParser().parseFromString(text, "text/html");
          if (!next.body) {
            throw new Error("no body");
          }
          document.title = next.title;
          document.body.replaceWith(document.adoptNode(next.body));
          refreshes += 1;
          root.setAttribute("data-refreshes", String(refreshes));
          root.classList.remove("stale");
        });
      })
      .catch(function () {
        root.classList.add("stale");
      })
      .then(schedule);
  }

  schedule();
})();
