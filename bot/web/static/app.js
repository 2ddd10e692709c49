// loracord's pages: confirmations, copy buttons, a zoomable and swipeable image viewer, and the
// live box of a running training (server-sent events; new previews come in without a reload).
"use strict";

document.querySelectorAll("form[data-confirm]").forEach((form) => {
  form.addEventListener("submit", (ev) => {
    if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
  });
});

function wireCopy(root) {
  root.querySelectorAll("button.copy").forEach((button) => {
    button.addEventListener("click", async () => {
      const text = button.parentElement.querySelector("pre").textContent;
      try {
        await navigator.clipboard.writeText(text);
      } catch (e) {
        // Plain http on a LAN address is not a secure context: no clipboard API there.
        const area = document.createElement("textarea");
        area.value = text;
        document.body.appendChild(area);
        area.select();
        document.execCommand("copy");
        area.remove();
      }
      button.textContent = "Copied";
    });
  });
}

// ---- the viewer: tap an image to see it whole, tap again for full size, swipe or arrow keys for the next ----
function openViewer(images, index) {
  const box = document.createElement("div");
  box.className = "lightbox";
  box.setAttribute("role", "dialog");
  const bar = document.createElement("div");
  bar.className = "bar";
  const prev = document.createElement("button");
  prev.textContent = "‹";
  prev.setAttribute("aria-label", "previous");
  const label = document.createElement("span");
  const next = document.createElement("button");
  next.textContent = "›";
  next.setAttribute("aria-label", "next");
  const close = document.createElement("button");
  close.textContent = "✕";
  close.setAttribute("aria-label", "close");
  bar.append(prev, label, next, close);
  const img = document.createElement("img");
  box.append(img, bar);
  document.body.appendChild(box);

  function show(i) {
    index = (i + images.length) % images.length;
    img.src = images[index].src;
    img.alt = images[index].alt;
    img.classList.remove("zoomed");
    box.classList.remove("zoom");
    label.textContent = images[index].alt;
  }
  function done() {
    box.remove();
    document.removeEventListener("keydown", keys);
  }
  function keys(ev) {
    if (ev.key === "Escape") done();
    else if (ev.key === "ArrowRight") show(index + 1);
    else if (ev.key === "ArrowLeft") show(index - 1);
  }
  prev.addEventListener("click", () => show(index - 1));
  next.addEventListener("click", () => show(index + 1));
  close.addEventListener("click", done);
  img.addEventListener("click", () => {
    img.classList.toggle("zoomed");
    box.classList.toggle("zoom");
  });
  let startX = null;
  box.addEventListener("touchstart", (ev) => {
    startX = ev.touches.length === 1 ? ev.touches[0].clientX : null;
  });
  box.addEventListener("touchend", (ev) => {
    if (startX === null || img.classList.contains("zoomed")) return;
    const dx = ev.changedTouches[0].clientX - startX;
    if (Math.abs(dx) > 50) show(index + (dx < 0 ? 1 : -1));
  });
  document.addEventListener("keydown", keys);
  show(index);
}

function wireViewer(root) {
  root.querySelectorAll("img[data-zoom]").forEach((img) => {
    img.addEventListener("click", () => {
      const section = img.closest("section") || document;
      const images = Array.from(section.querySelectorAll("img[data-zoom]"));
      openViewer(images, images.indexOf(img));
    });
  });
}

// ---- the live box ----
function duration(s) {
  s = Math.round(Math.max(s, 0));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

async function refreshSections() {
  const page = await fetch(window.location.pathname, { credentials: "same-origin" });
  if (!page.ok) return;
  const doc = new DOMParser().parseFromString(await page.text(), "text/html");
  for (const id of ["library", "epochs", "compare", "weights"]) {
    const fresh = doc.getElementById(id);
    const old = document.getElementById(id);
    if (fresh && old) old.replaceWith(fresh);
    else if (fresh) document.getElementById("loss-section").before(fresh);
    if (fresh) {
      wireViewer(fresh);
      wireCopy(fresh);
    }
  }
  if (window.loracordLoss) window.loracordLoss();
}

const live = document.getElementById("live");
if (live && live.dataset.active === "1" && window.EventSource) {
  const seen = document.querySelectorAll("#epochs article.epoch").length;
  let epochs = seen;
  let lossDrawn = Date.now();
  const source = new EventSource(live.dataset.src);
  source.onmessage = async (msg) => {
    const now = JSON.parse(msg.data);
    const p = now.progress;
    const text = live.querySelector('[data-live="text"]');
    if (p && p.step !== undefined) {
      const total = p.total_epochs ? `/${p.total_epochs}` : "";
      text.textContent = `epoch ${p.epoch}${total} · step ${p.step}/${p.total_steps} · loss ${p.loss.toFixed(4)}`;
      live.querySelector('[data-live="bar"]').value = p.step / Math.max(p.total_steps, 1);
      live.querySelector('[data-live="eta"]').textContent = `ETA ${duration(p.eta_s)}`;
    }
    if (now.cancel_requested) text.textContent += " · stopping";
    if (window.loracordLoss && Date.now() - lossDrawn > 5000) {
      lossDrawn = Date.now();
      window.loracordLoss();
    }
    const ended = now.state !== "queued" && now.state !== "running";
    if (now.epochs.length !== epochs || ended) {
      epochs = now.epochs.length;
      await refreshSections();
    }
    if (ended) {
      source.close();
      text.textContent = now.state === "done" ? "finished" : `${now.state}${now.failure ? ": " + now.failure : ""}`;
      live.querySelectorAll("form").forEach((f) => f.remove());
      live.querySelector('[data-live="eta"]').textContent = "";
    }
  };
}

wireCopy(document);
wireViewer(document);
