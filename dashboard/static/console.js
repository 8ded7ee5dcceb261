// Campanile console: live progress over server-sent events, the listen preview, and recordings
// (a WAV file or the microphone) uploaded to the tenant's audio store. Everything here is an
// enhancement: the pages work for reading and acting without it.
"use strict";

function csrf() {
  const f = document.querySelector('input[name="csrf"]');
  return f ? f.value : "";
}

// ---- campaign page: live counters and chart ----
(function live() {
  const box = document.getElementById("campaign");
  if (!box || !window.EventSource) return;
  const id = box.dataset.id;
  const points = [];
  const status = document.getElementById("live");
  const es = new EventSource("/campaigns/" + id + "/events");
  es.addEventListener("progress", (ev) => {
    let p;
    try { p = JSON.parse(ev.data); } catch (e) { return; }
    for (const [k, v] of Object.entries(p.counts)) {
      const el = document.getElementById("count-" + k);
      if (el) el.textContent = v;
    }
    const ratio = document.getElementById("answer-ratio");
    if (ratio) ratio.textContent = Math.round(100 * p.answer_ratio) + "%";
    const state = document.getElementById("state");
    if (state) { state.textContent = p.state; state.className = "state-" + p.state; }
    // A finished campaign has nothing left to pause or cancel.
    if (p.state === "completed" || p.state === "cancelled") {
      for (const id of ["pause", "resume", "cancel", "start", "approve"]) {
        const b = document.getElementById(id);
        if (b && b.form) b.form.hidden = true;
      }
    }
    const appr = document.getElementById("approval");
    if (appr) appr.textContent = p.approval || "not needed";
    const t = p.counts.targeted || 1;
    points.push({ at: p.at_ms, c: p.counts.confirmed / t, a: p.answer_ratio });
    draw(points);
    if (status) status.textContent = "live · updated " + new Date(p.at_ms).toLocaleTimeString();
  });
  es.onerror = () => { if (status) status.textContent = "reconnecting…"; };
})();

function draw(points) {
  if (points.length === 0) return;
  const t0 = points[0].at, t1 = Math.max(points[points.length - 1].at, t0 + 1);
  const xy = (p, key) => {
    const x = 5 + 590 * (p.at - t0) / (t1 - t0);
    const y = 195 - 190 * Math.max(0, Math.min(1, p[key]));
    return x.toFixed(1) + "," + y.toFixed(1);
  };
  const c = document.getElementById("line-confirmed");
  const a = document.getElementById("line-answered");
  if (c) c.setAttribute("points", points.map((p) => xy(p, "c")).join(" "));
  if (a) a.setAttribute("points", points.map((p) => xy(p, "a")).join(" "));
}

// ---- compose page ----
(function compose() {
  const form = document.getElementById("compose");
  if (!form) return;
  const kind = () => (form.querySelector('input[name="message_kind"]:checked') || {}).value;
  const toggle = () => {
    document.getElementById("tts-fields").hidden = kind() === "recording";
    document.getElementById("recording-fields").hidden = kind() !== "recording";
  };
  form.querySelectorAll('input[name="message_kind"]').forEach((r) => r.addEventListener("change", toggle));
  toggle();

  const previewStatus = document.getElementById("preview-status");
  document.getElementById("preview").addEventListener("click", async () => {
    const text = document.getElementById("text").value.trim();
    const lang = document.getElementById("language").value;
    if (!text) { previewStatus.textContent = "Write the message first."; return; }
    previewStatus.textContent = "Preparing…";
    const r = await fetch("/api/v1/preview?text=" + encodeURIComponent(text) + "&language=" + encodeURIComponent(lang));
    if (!r.ok) { previewStatus.textContent = await errorText(r); return; }
    const audio = document.getElementById("preview-audio");
    audio.src = URL.createObjectURL(await r.blob());
    audio.hidden = false;
    previewStatus.textContent = "Ready: this is what citizens will hear.";
    audio.play().catch(() => {});
  });

  const uploadStatus = document.getElementById("upload-status");
  async function upload(blob) {
    uploadStatus.textContent = "Uploading…";
    const tenant = document.getElementById("tenant").value;
    const r = await fetch("/api/v1/audio?tenant=" + encodeURIComponent(tenant), {
      method: "POST", headers: { "X-CSRF-Token": csrf(), "Content-Type": "audio/wav" }, body: blob,
    });
    if (!r.ok) { uploadStatus.textContent = await errorText(r); return; }
    const j = await r.json();
    document.getElementById("recording_sha256").value = j.sha256;
    uploadStatus.textContent = "Recording stored (" + Math.round(j.duration_ms / 1000) + " s).";
  }
  document.getElementById("wav").addEventListener("change", (ev) => {
    const f = ev.target.files[0];
    if (f) upload(f);
  });

  let recorder = null;
  document.getElementById("record").addEventListener("click", async (ev) => {
    const button = ev.target;
    if (recorder) { recorder.stop(); return; }
    if (!navigator.mediaDevices) { uploadStatus.textContent = "This browser cannot record."; return; }
    let stream;
    try { stream = await navigator.mediaDevices.getUserMedia({ audio: true }); }
    catch (e) { uploadStatus.textContent = "The microphone is not available: " + e.message; return; }
    const chunks = [];
    recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (e) => chunks.push(e.data);
    recorder.onstop = async () => {
      stream.getTracks().forEach((t) => t.stop());
      recorder = null;
      button.textContent = "Record with the microphone";
      const ctx = new AudioContext();
      const decoded = await ctx.decodeAudioData(await new Blob(chunks).arrayBuffer());
      upload(wavOf(decoded));
    };
    recorder.start();
    button.textContent = "Stop recording";
    uploadStatus.textContent = "Recording… speak now.";
  });
})();

async function errorText(r) {
  try { const j = await r.json(); return j.error.message; } catch (e) { return "Failed (" + r.status + ")."; }
}

// A decoded recording as a 16-bit mono WAV file (the node resamples it to 8 kHz).
function wavOf(buf) {
  const n = buf.length, rate = buf.sampleRate;
  const mono = new Float32Array(n);
  for (let ch = 0; ch < buf.numberOfChannels; ch++) {
    const d = buf.getChannelData(ch);
    for (let i = 0; i < n; i++) mono[i] += d[i] / buf.numberOfChannels;
  }
  const out = new DataView(new ArrayBuffer(44 + 2 * n));
  const str = (o, s) => { for (let i = 0; i < s.length; i++) out.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); out.setUint32(4, 36 + 2 * n, true); str(8, "WAVE"); str(12, "fmt ");
  out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
  out.setUint32(24, rate, true); out.setUint32(28, rate * 2, true); out.setUint16(32, 2, true);
  out.setUint16(34, 16, true); str(36, "data"); out.setUint32(40, 2 * n, true);
  for (let i = 0; i < n; i++) out.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, mono[i])) * 32767, true);
  return new Blob([out], { type: "audio/wav" });
}
