// featurescope: token tooltips, keyboard shortcuts and the copy-link button.
// Reading works without this file; it only adds conveniences. It never builds HTML from
// strings: token text goes into the DOM through textContent.
(() => {
  "use strict";

  const KEYS = { ArrowLeft: "prev", k: "prev", ArrowRight: "next", j: "next", r: "random", c: "copy" };

  // Whitespace made visible in the tooltip (newlines and tabs already are, in the page).
  const visible = (text) => text.replace(/ /g, "\u2423");

  function showTip(span) {
    const tip = document.getElementById("tip");
    if (!tip) return;
    if (span.title) {  // keep the value, drop the native tooltip that would cover ours
      span.dataset.v = span.title;
      span.removeAttribute("title");
    }
    const tok = document.createElement("code");
    tok.className = "tip-tok";
    tok.textContent = visible(span.textContent);
    const val = document.createElement("span");
    val.className = "tip-val";
    val.textContent = span.dataset.v || "0";
    tip.replaceChildren(tok, val);
    if (span.classList.contains("pk")) {
      const peak = document.createElement("span");
      peak.className = "tip-peak";
      peak.textContent = "peak";
      tip.append(peak);
    }
    tip.hidden = false;
    const r = span.getBoundingClientRect();
    const w = tip.offsetWidth;
    const left = Math.max(4, Math.min(r.left + r.width / 2 - w / 2, window.innerWidth - w - 4));
    const above = r.top - tip.offsetHeight - 6;
    tip.style.left = `${left + window.scrollX}px`;
    tip.style.top = `${(above > 0 ? above : r.bottom + 6) + window.scrollY}px`;
  }

  document.addEventListener("mouseover", (ev) => {
    const span = ev.target.closest && ev.target.closest(".toks .t");
    if (span) showTip(span);
  });
  document.addEventListener("mouseout", (ev) => {
    const span = ev.target.closest && ev.target.closest(".toks .t");
    const tip = document.getElementById("tip");
    if (span && tip && !span.contains(ev.relatedTarget)) tip.hidden = true;
  });

  async function copyLink(button) {
    const url = window.location.href;
    try {
      await navigator.clipboard.writeText(url);
    } catch (_) {
      const area = document.createElement("textarea");
      area.value = url;
      area.setAttribute("readonly", "");
      area.className = "offscreen";
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    button.dataset.copied = url;
    const label = button.textContent;
    button.textContent = "copied ✓";
    setTimeout(() => { button.textContent = label; }, 1200);
  }

  document.addEventListener("click", (ev) => {
    const button = ev.target.closest && ev.target.closest("[data-copy]");
    if (button) copyLink(button);
  });

  document.addEventListener("keydown", (ev) => {
    if (ev.defaultPrevented || ev.altKey || ev.ctrlKey || ev.metaKey || ev.isComposing) return;
    const t = ev.target;
    if (t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName))) return;
    const id = KEYS[ev.key];
    const el = id && document.getElementById(id);
    if (!el) return;
    ev.preventDefault();
    el.click();
  });

  // Head examples with stored rows (data-rows): hovering or focusing a token recolours the
  // example by that token's own attention row (its data-row: the weights, space separated);
  // leaving the example restores the peak query's row.
  const ALPHA = /^(a\d+|s)$/;

  function showRow(span) {
    const ex = span.closest("[data-rows]");
    const weights = span.dataset.row.split(" ").map(Number);
    ex.querySelectorAll(".toks .t").forEach((s, i) => {
      if (!("cls" in s.dataset)) s.dataset.cls = s.className;
      const cls = s.dataset.cls.split(" ").filter((c) => !ALPHA.test(c) && c !== "from");
      const k = Math.min(Math.round((weights[i] || 0) * 100), 100);
      if (k > 0) cls.push(`a${k}`);
      if (s === span) cls.push("from");
      s.className = cls.join(" ");
    });
  }

  function restoreRows(ex) {
    ex.querySelectorAll(".toks .t").forEach((s) => {
      if ("cls" in s.dataset) s.className = s.dataset.cls;
    });
  }

  const rowSpan = (el) => el && el.closest && el.closest("[data-rows] .t[data-row]");
  const leaving = (ev) => {
    const ex = ev.target.closest && ev.target.closest("[data-rows]");
    if (ex && !ex.contains(ev.relatedTarget)) restoreRows(ex);
  };
  document.addEventListener("mouseover", (ev) => { const s = rowSpan(ev.target); if (s) showRow(s); });
  document.addEventListener("focusin", (ev) => { const s = rowSpan(ev.target); if (s) showRow(s); });
  document.addEventListener("mouseout", leaving);
  document.addEventListener("focusout", leaving);

  // After htmx swaps in another feature, hide a tooltip left from the old one.
  document.addEventListener("htmx:afterSwap", () => {
    const tip = document.getElementById("tip");
    if (tip) tip.hidden = true;
  });
})();
