// labkit ranking board (anywidget front end of labkit.widgets.RankingWidget).
// The Python side owns the state; this view only draws it and sends commands.
// Model outputs are untrusted: every piece of text goes through textContent, never parsed as markup.

const KEYS = "1-9: rank · t: tie with previous · u / Backspace: undo · r: reset · Enter: submit · s: skip · drag a header to reorder";

function h(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function render({ model, el }) {
  const send = (cmd, extra) => model.send(Object.assign({ cmd }, extra || {}));
  const root = h("div", "lk-board");
  root.tabIndex = 0;
  // JupyterLab: keys pressed inside the board are the board's, not notebook shortcuts.
  root.setAttribute("data-lm-suppress-shortcuts", "true");
  el.appendChild(root);

  // ---- static skeleton ------------------------------------------------------------
  const head = h("div", "lk-head");
  const title = h("div", "lk-title", "Rank the responses, best first");
  const who = h("label", "lk-who", "Annotator ");
  const name = h("input", "lk-name");
  name.placeholder = "your name";
  who.appendChild(name);
  const prog = h("div", "lk-progress");
  const bar = h("div", "lk-bar");
  const fill = h("div", "lk-fill");
  bar.appendChild(fill);
  const progText = h("span", "lk-progress-text");
  prog.append(bar, progText);
  head.append(title, who, prog);

  const promptBox = h("div", "lk-prompt");
  const cards = h("div", "lk-cards");
  const order = h("div", "lk-order");

  const meta = h("div", "lk-meta");
  const scoreRow = h("div", "lk-score");
  scoreRow.appendChild(h("span", "lk-label", "Overall 1-7"));
  const scoreButtons = [];
  for (let s = 1; s <= 7; s++) {
    const b = h("button", "lk-chip lk-score-btn", s);
    b.type = "button";
    b.title = `overall quality ${s} of 7`;
    b.addEventListener("click", () => {
      model.set("score", model.get("score") === s ? 0 : s);
      model.save_changes();
      root.focus();
    });
    scoreButtons.push(b);
    scoreRow.appendChild(b);
  }
  const flagRow = h("div", "lk-flags");
  const flagButtons = {};
  for (const f of model.get("flag_names")) {
    const b = h("button", "lk-chip lk-flag", f.replaceAll("_", " "));
    b.type = "button";
    b.addEventListener("click", () => {
      const on = new Set(model.get("flags"));
      on.has(f) ? on.delete(f) : on.add(f);
      model.set("flags", [...on]);
      model.save_changes();
      root.focus();
    });
    flagButtons[f] = b;
    flagRow.appendChild(b);
  }
  const comment = h("input", "lk-comment");
  comment.placeholder = "comment (optional)";
  meta.append(scoreRow, flagRow, comment);

  const tools = h("div", "lk-tools");
  const mk = (label, cmd, cls, tip) => {
    const b = h("button", "lk-btn " + (cls || ""), label);
    b.type = "button";
    b.title = tip;
    b.dataset.cmd = cmd;
    b.addEventListener("click", () => { send(cmd); root.focus(); });
    tools.appendChild(b);
    return b;
  };
  const tieBtn = mk("Tie with previous", "tie", "", "t: the next response shares the previous one's place");
  mk("Undo", "undo", "", "u or Backspace");
  mk("Reset", "reset", "", "r");
  mk("Skip", "skip", "lk-skip", "s");
  const submitBtn = mk("Submit", "submit", "lk-submit", "Enter");
  const msg = h("div", "lk-msg");
  const help = h("div", "lk-help", KEYS);
  root.append(head, promptBox, cards, order, meta, tools, msg, help);

  // ---- drag and drop: a response dropped on another goes just above it (Shift: ties) --
  const DRAG = "application/x-labkit-response";
  function dragSource(node, i) {
    node.addEventListener("dragstart", (e) => {
      e.dataTransfer.setData(DRAG, String(i));
      e.dataTransfer.effectAllowed = "move";
      root.classList.add("lk-dragging");
    });
    node.addEventListener("dragend", () => root.classList.remove("lk-dragging"));
  }
  function dropTarget(node, before) {
    node.addEventListener("dragover", (e) => {
      if (!e.dataTransfer.types.includes(DRAG)) return;
      e.preventDefault();
      e.stopPropagation();
      node.classList.add("lk-drop");
    });
    node.addEventListener("dragleave", () => node.classList.remove("lk-drop"));
    node.addEventListener("drop", (e) => {
      node.classList.remove("lk-drop");
      if (!e.dataTransfer.types.includes(DRAG)) return;
      e.preventDefault();
      e.stopPropagation();
      const index = Number(e.dataTransfer.getData(DRAG));
      send("move", { index, before, tie: e.shiftKey });
      root.focus();
    });
  }
  dropTarget(order, null); // dropped on the ranking line itself: goes last

  // ---- drawing --------------------------------------------------------------------
  let cardEls = [];

  function drawItem() {
    const item = model.get("item") || {};
    promptBox.replaceChildren();
    cards.replaceChildren();
    cardEls = [];
    root.classList.toggle("lk-finished", !item.responses);
    if (!item.responses) {
      promptBox.appendChild(h("div", "lk-done", "All items are done. Thank you!"));
      drawRanks();
      return;
    }
    const top = h("div", "lk-prompt-top");
    top.append(h("span", "lk-pill", item.category || "prompt"), h("span", "lk-id", item.prompt_id));
    promptBox.append(top, h("pre", "lk-prompt-text", item.prompt));
    if (item.checks && item.checks.length) {
      const ul = h("ul", "lk-checks");
      ul.appendChild(h("li", "lk-checks-title", "The answer must have:"));
      for (const c of item.checks) ul.appendChild(h("li", "", c));
      promptBox.appendChild(ul);
    }
    const k = item.responses.length; // 2x2 for K = 4, rows of three otherwise
    cards.style.setProperty("--lk-cols", String(k <= 2 || k === 4 ? 2 : 3));
    item.responses.forEach((text, i) => {
      const card = h("div", "lk-card");
      card.dataset.index = String(i);
      card.setAttribute("role", "button");
      card.setAttribute("aria-label", `Response ${i + 1}: click to give it the next rank`);
      const top = h("div", "lk-card-top");
      top.draggable = true; // the header is the drag handle; the text stays selectable
      top.title = "drag onto another response to place it just above (Shift: tie)";
      dragSource(top, i);
      dropTarget(card, i);
      const badge = h("span", "lk-badge", "–");
      top.append(h("span", "lk-key", i + 1), h("span", "lk-card-title", `Response ${i + 1}`), h("span", "lk-grip", "⠿"), badge);
      const body = h("pre", "lk-text", text);
      card.append(top, body);
      if (item.truncated && item.truncated[i]) {
        // the model hit the length limit: the answer did not end on its own (the gold labeler counts it)
        card.classList.add("lk-cut");
        const cut = h("div", "lk-cutoff", "✂ cut off: the answer hit the length limit");
        cut.title = "the model did not stop on its own; the text ends where the length limit cut it";
        card.appendChild(cut);
      }
      card.addEventListener("click", () => {
        if (window.getSelection && String(window.getSelection()).length > 0) return; // selecting text
        send("rank", { index: i });
        root.focus();
      });
      cards.appendChild(card);
      cardEls.push({ card, badge });
    });
    drawRanks();
  }

  function drawRanks() {
    const tiers = model.get("tiers") || [];
    const tieNext = model.get("tie_next");
    const place = {};
    let position = 1; // competition ranking: 1, 2, 2, 4
    tiers.forEach((tier) => { tier.forEach((i) => { place[i] = { rank: position, tied: tier.length > 1 }; }); position += tier.length; });
    cardEls.forEach(({ card, badge }, i) => {
      const p = place[i];
      card.classList.toggle("lk-ranked", !!p);
      card.dataset.rank = p ? String(Math.min(p.rank, 5)) : "";
      badge.textContent = p ? (p.tied ? `= #${p.rank}` : `#${p.rank}`) : "–";
    });
    order.replaceChildren();
    order.appendChild(h("span", "lk-label", "Your ranking"));
    if (!tiers.length) order.appendChild(h("span", "lk-hint", "click the best response first (or press its number)"));
    tiers.forEach((tier, t) => {
      if (t) order.appendChild(h("span", "lk-gt", ">"));
      tier.forEach((i, j) => {
        if (j) order.appendChild(h("span", "lk-eq", "="));
        const chip = h("span", "lk-chip lk-on", i + 1);
        chip.draggable = true;
        chip.dataset.index = String(i);
        dragSource(chip, i);
        dropTarget(chip, i);
        order.appendChild(chip);
      });
    });
    if (tieNext) order.appendChild(h("span", "lk-eq lk-pending", "= …"));
    tieBtn.classList.toggle("lk-active", !!tieNext);
    const k = (model.get("item").responses || []).length;
    const ranked = tiers.reduce((n, t) => n + t.length, 0);
    submitBtn.disabled = !k || ranked < k - 1;
  }

  function drawMeta() {
    const score = model.get("score");
    scoreButtons.forEach((b, s) => b.classList.toggle("lk-on", score === s + 1));
    const flags = new Set(model.get("flags"));
    for (const [f, b] of Object.entries(flagButtons)) b.classList.toggle("lk-on", flags.has(f));
    if (document.activeElement !== comment) comment.value = model.get("comment");
    if (document.activeElement !== name) name.value = model.get("annotator");
  }

  function drawProgress() {
    const done = model.get("done"), total = model.get("total");
    fill.style.width = total ? `${(100 * done) / total}%` : "0%";
    progText.textContent = `${done} of ${total} done`;
  }

  function drawMessage() {
    const text = model.get("message") || "";
    msg.textContent = text;
    msg.classList.toggle("lk-error", /^(Not saved|Rank every|There is no|Rank a response)/.test(text) || / already ranked/.test(text));
  }

  // ---- input ----------------------------------------------------------------------
  name.addEventListener("change", () => { model.set("annotator", name.value.trim()); model.save_changes(); });
  comment.addEventListener("change", () => { model.set("comment", comment.value); model.save_changes(); });
  for (const input of [name, comment]) {
    input.addEventListener("keydown", (e) => {
      e.stopPropagation(); // typing is typing, not shortcuts
      if (e.key === "Enter" || e.key === "Escape") { input.dispatchEvent(new Event("change")); root.focus(); }
    });
  }
  root.addEventListener("keydown", (e) => {
    if (e.target !== root && e.target.tagName === "INPUT") return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const k = e.key;
    let cmd = null;
    if (/^[1-9]$/.test(k)) cmd = ["rank", { index: Number(k) - 1 }];
    else if (k === "t" || k === "=") cmd = ["tie"];
    else if (k === "u" || k === "Backspace") cmd = ["undo"];
    else if (k === "r") cmd = ["reset"];
    else if (k === "Enter") cmd = ["submit"];
    else if (k === "s") cmd = ["skip"];
    if (!cmd) return;
    e.preventDefault();
    e.stopPropagation();
    send(...cmd);
  });

  model.on("change:item", drawItem);
  model.on("change:tiers", drawRanks);
  model.on("change:tie_next", drawRanks);
  for (const t of ["score", "flags", "comment", "annotator"]) model.on(`change:${t}`, drawMeta);
  model.on("change:done", drawProgress);
  model.on("change:total", drawProgress);
  model.on("change:message", drawMessage);
  drawItem();
  drawMeta();
  drawProgress();
  drawMessage();
  setTimeout(() => root.focus({ preventScroll: true }), 0);
}

export default { render };
