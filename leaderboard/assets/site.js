// Sortable tables: click a header to sort by that column; numeric columns sort by data-v (empty last).
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.querySelectorAll("thead th");
  heads.forEach(function (th, index) {
    th.addEventListener("click", function () {
      var numeric = th.dataset.type === "num";
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[index];
        var raw = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent.trim();
        if (!numeric) { return raw.toLowerCase(); }
        return raw === "" ? null : parseFloat(raw);
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
        if (x < y) { return ascending ? -1 : 1; }
        if (x > y) { return ascending ? 1 : -1; }
        return 0;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});

// Routing heatmaps: one per backend, the select shows one at a time.
document.querySelectorAll("select.routing-backend").forEach(function (select) {
  select.addEventListener("change", function () {
    select.closest("figure").querySelectorAll("svg.heatmap").forEach(function (svg) {
      svg.hidden = svg.dataset.backend !== select.value;
    });
  });
});

// Table filters: one select per column (backend, load, dtype); a row shows when it matches every one.
document.querySelectorAll("div.filters").forEach(function (bar) {
  var table = document.getElementById("table-" + bar.dataset.table);
  var selects = bar.querySelectorAll("select[data-filter]");
  function apply() {
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      row.hidden = Array.prototype.some.call(selects, function (s) {
        return s.value !== "" && row.dataset[s.dataset.filter] !== s.value;
      });
    });
  }
  selects.forEach(function (s) { s.addEventListener("change", apply); });
});
