// keyfence console enhancement (own code, no library). Every form works
// without it; this only adds live validation of allow lists, the copy
// button and the step-up (TOTP) dialog. Loaded as a file: the
// Content-Security-Policy allows no inline script.
(function () {
  "use strict";
  var meta = document.querySelector('meta[name="csrf"]');
  var csrf = meta ? meta.content : "";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function show(out, answer, text) {
    out.textContent = "";
    if (!answer.valid) {
      var ul = el("ul", "error");
      ul.id = out.id + "-errors";
      answer.errors.forEach(function (e) {
        var li = el("li", "", "entry " + e.position + " \u201c" + e.entry + "\u201d: " + e.reason);
        ul.appendChild(li);
      });
      out.appendChild(ul);
    } else if (text.trim() === "") {
      out.appendChild(el("p", "hint", out.id === "add-check" ? "" : "Empty: this key will work from anywhere."));
    } else {
      out.appendChild(el("p", "ok", "Valid: " + answer.entries.length + " entries, covering " + answer.addresses + "."));
    }
  }

  document.querySelectorAll("textarea[data-check]").forEach(function (area) {
    var out = document.getElementById(area.dataset.check);
    var timer = null;
    var seq = 0;
    function run() {
      var mine = ++seq;
      var text = area.value;
      fetch("/check", {
        method: "POST",
        headers: { "content-type": "text/plain", "x-csrf-token": csrf },
        body: text,
        credentials: "same-origin"
      }).then(function (r) { return r.ok ? r.json() : null; })
        .then(function (answer) { if (answer && mine === seq) show(out, answer, text); })
        .catch(function () {});
    }
    area.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(run, 250);
    });
  });

  document.querySelectorAll("button[data-copy]").forEach(function (b) {
    b.hidden = false;
    b.addEventListener("click", function () {
      var input = document.getElementById(b.dataset.copy);
      input.select();
      var done = function () { b.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(input.value).then(done, function () {});
      } else if (document.execCommand("copy")) {
        done();
      }
    });
  });

  // Step-up: forms marked data-step-up ask for the code in a dialog.
  var forms = document.querySelectorAll("form[data-step-up]");
  if (forms.length && typeof HTMLDialogElement === "function") {
    var dialog = el("dialog");
    dialog.id = "totp-dialog";
    var f = el("form");
    f.method = "dialog";
    var label = el("label", "", "Confirmation code (TOTP, 6 digits)");
    label.htmlFor = "totp-code";
    var input = el("input");
    input.id = "totp-code";
    input.inputMode = "numeric";
    input.autocomplete = "one-time-code";
    input.maxLength = 6;
    var ok = el("button", "", "Confirm");
    ok.value = "ok";
    ok.id = "totp-confirm";
    var cancel = el("button", "", "Cancel");
    cancel.value = "cancel";
    f.appendChild(label); f.appendChild(input); f.appendChild(ok); f.appendChild(cancel);
    dialog.appendChild(f);
    document.body.appendChild(dialog);
    var pending = null;
    dialog.addEventListener("close", function () {
      if (dialog.returnValue === "ok" && pending) {
        pending.form.querySelector('input[name="code"]').value = input.value;
        pending.form.dataset.confirmed = "1";
        if (pending.submitter && pending.form.requestSubmit) pending.form.requestSubmit(pending.submitter);
        else pending.form.submit();
      }
      pending = null;
    });
    forms.forEach(function (form) {
      var field = form.querySelector(".code-field");
      var code = form.querySelector('input[name="code"]');
      if (!code) return;
      // An error about the code stays visible next to it.
      if (field && !field.querySelector(".error")) field.classList.add("js-hidden");
      form.addEventListener("submit", function (ev) {
        var submitter = ev.submitter;
        if (submitter && submitter.value === "preview") return;
        if (form.dataset.confirmed === "1" || code.value.trim() !== "") return;
        ev.preventDefault();
        pending = { form: form, submitter: submitter };
        input.value = "";
        dialog.showModal();
        input.focus();
      });
    });
    var err = document.getElementById("code-error");
    if (err) err.scrollIntoView();
  }
})();
