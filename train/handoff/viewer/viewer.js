// The handoff bundle's viewer: the twin's splat (and mesh) from this bundle folder, offline.
//
// Reads ../splat/splat.ply, ../cameras/cameras.json, ../cameras/transforms.json (held-out cameras),
// ../MANIFEST.json (AI-disclosure label, subject id) and, on demand, ../geometry/mesh.glb. Renders
// with Spark 2.2.0 on three.js 0.187 (vendor/, see vendor/LICENSES.md), in the studio frame as it
// is (metres, z up): no axis flip.
//
// URL parameters (for automation; a person uses the controls):
//   camera=<id>        exactly that rig camera: OpenCV intrinsics incl. the principal point
//                      (camera.setViewOffset), a canvas of the camera's width x height device pixels
//                      (devicePixelRatio 1), the pose as calibrated; no orbit
//   background=r,g,b   the background, 0..1, as given to the project's rasteriser (0.85 -> byte 217)
//   mesh=1             show the mesh (geometry/mesh.glb); splat=0 hides the splat
// Without camera=, the canvas fills the window and orbits around the subject (z up); the picker
// jumps to any rig camera.
//
// window.twinViewer is for tests and scripts: {ready: Promise (resolves when the image is stable:
// the same pixels for STABLE_FRAMES frames in a row once the splat is loaded and sorted: Spark's
// first frames, while it sorts, are empty and not counted; rejects on an error), frames, splats,
// error, readyMs (performance.now() at readiness), timings (the same clock at each step),
// snapshot() (a Promise of a PNG data URL of the canvas's pixels, read back from WebGL: exactly
// the canvas, no overlay)}.

// Identical read-backs in a row (once Spark has loaded and sorted) that make the image ready. Each
// frame of the 62k-Gaussian demo twin at 1280x960 takes ~1.4 s in SwiftShader on 2 cores, so no more.
const STABLE_FRAMES = 2;
const DEFAULT_BACKGROUND = [0.85, 0.85, 0.85];
const AI_LABEL = "AI-generated digital twin";
// Spark's settings that match the project's rasteriser (gsplat's classic mode): 0.3 px^2 added to
// every 2D covariance with no antialiasing compensation (Spark's defaults: 32 dB), sorted by depth,
// not radially, Gaussians drawn to 3 standard deviations, fragments under alpha 1/255 skipped. With
// extended splat encoding (float32 centres and finer scales and colours instead of Spark's 16-byte
// packing) the demo twin's held-out camera agrees to 62 dB (47 dB on the subject; packed: 56 / 42).
const SPARK_OPTIONS = { preBlurAmount: 0.3, blurAmount: 0.0, sortRadial: false, maxStdDev: 3.0,
  minAlpha: 1 / 255, accumExtSplats: true };

const params = new URLSearchParams(location.search);
let resolveReady;
let rejectReady;
const viewer = {
  ready: new Promise((res, rej) => { resolveReady = res; rejectReady = rej; }),
  frames: 0, splats: 0, error: null, readyMs: null, camera: params.get("camera"), snapshot: null,
  timings: {},  // performance.now() (ms since navigation) at: modules, files, splat (parsed), sorted, ready
};
const mark = (what) => { viewer.timings[what] ??= Math.round(performance.now()); };
viewer.ready.catch(() => {});  // the error is shown on the page; callers that await it see it too
window.twinViewer = viewer;

const $ = (id) => document.getElementById(id);

function fail(err) {
  const msg = err instanceof Error ? err.message : String(err);
  if (viewer.error === null) {
    viewer.error = msg;
    const box = $("error");
    box.textContent = `The viewer cannot show this twin: ${msg}`;
    box.hidden = false;
    $("status").textContent = "error";
    rejectReady(new Error(msg));
  }
}
window.addEventListener("error", (e) => fail(e.error || e.message));
window.addEventListener("unhandledrejection", (e) => fail(e.reason));

// The bytes of a bundle file, relative to this page. fetch() for http(s); XMLHttpRequest for file://
// pages, where Chromium's fetch() refuses the scheme (XHR works with --allow-file-access-from-files).
function loadBytes(rel, { optional = false } = {}) {
  const url = new URL(rel, location.href);
  const missing = (why) => optional ? null : Promise.reject(new Error(`${url.pathname.split("/").slice(-2).join("/")}: ${why}`));
  if (url.protocol === "file:") {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("GET", url.href);
      xhr.responseType = "arraybuffer";
      xhr.onload = () => (xhr.status === 0 || xhr.status === 200) && xhr.response
        ? resolve(new Uint8Array(xhr.response))
        : Promise.resolve(missing("not found")).then(resolve, reject);
      xhr.onerror = () => Promise.resolve(missing("cannot be read (missing, or the browser does not let a " +
        "file:// page read files: Chromium's --allow-file-access-from-files; or serve the bundle: " +
        "twinstudio view BUNDLE)")).then(resolve, reject);
      xhr.send();
    });
  }
  return fetch(url, { cache: "no-store" }).then(
    (r) => r.ok ? r.arrayBuffer().then((b) => new Uint8Array(b)) : missing(`HTTP ${r.status}`),
    (e) => missing(`cannot be fetched (${e.message})`));
}

async function loadJson(rel, opts) {
  const bytes = await loadBytes(rel, opts);
  if (bytes === null) return null;
  try {
    return JSON.parse(new TextDecoder().decode(bytes));
  } catch (e) {
    throw new Error(`${rel.replace("../", "")}: not valid JSON (${e.message})`);
  }
}

function parseBackground(text) {
  if (text === null) return DEFAULT_BACKGROUND;
  const v = text.split(",").map(Number);
  if (v.length !== 3 || v.some((x) => !Number.isFinite(x) || x < 0 || x > 1)) {
    throw new Error(`background=${text}: expected three numbers in 0..1, e.g. background=0.85,0.85,0.85`);
  }
  return v;
}

// The point nearest to every rig camera's optical axis (least squares): where the rig looks, the subject.
function rigFocus(THREE, cams) {
  const A = [[0, 0, 0], [0, 0, 0], [0, 0, 0]];
  const b = [0, 0, 0];
  for (const c of cams) {
    const { R, t } = c.pose;
    const centre = [0, 1, 2].map((i) => -(R[0][i] * t[0] + R[1][i] * t[1] + R[2][i] * t[2]));
    const d = [R[2][0], R[2][1], R[2][2]];  // the optical axis (+z of the camera) in the world
    for (let i = 0; i < 3; i++) {
      for (let j = 0; j < 3; j++) {
        const m = (i === j ? 1 : 0) - d[i] * d[j];
        A[i][j] += m;
        b[i] += m * centre[j];
      }
    }
  }
  const M = new THREE.Matrix3().set(...A[0], ...A[1], ...A[2]);
  if (cams.length < 2 || Math.abs(M.determinant()) < 1e-9) return null;
  return new THREE.Vector3(...b).applyMatrix3(M.invert());
}

// Pose and projection of an OpenCV camera (x right, y down, z forward; pixel centres at integers) on a
// three.js camera (x right, y up, looking down -z) drawing into a view of viewW x viewH pixels: the
// camera's image is fitted into the view and centred; exact (one pixel each) when the sizes match.
function applyRigCamera(THREE, camera, cam, viewW, viewH) {
  const { R, t } = cam.pose;
  const { width: W, height: H, fx, fy, cx, cy } = cam.intrinsics;
  const c2w = new THREE.Matrix4().set(
    R[0][0], R[1][0], R[2][0], 0,
    R[0][1], R[1][1], R[2][1], 0,
    R[0][2], R[1][2], R[2][2], 0,
    0, 0, 0, 1);
  const centre = [0, 1, 2].map((i) => -(R[0][i] * t[0] + R[1][i] * t[1] + R[2][i] * t[2]));
  c2w.setPosition(...centre);
  c2w.multiply(new THREE.Matrix4().makeScale(1, -1, -1));  // OpenCV axes -> three.js camera axes
  c2w.decompose(camera.position, camera.quaternion, camera.scale);
  camera.updateMatrixWorld(true);
  const k = Math.min(viewW / W, viewH / H);
  camera.fov = THREE.MathUtils.radToDeg(2 * Math.atan(viewH / (2 * k * fy)));
  camera.aspect = (viewW * fy) / (viewH * fx);
  const px = k * (cx + 0.5) + (viewW - k * W) / 2;  // the principal point in view pixels
  const py = k * (cy + 0.5) + (viewH - k * H) / 2;
  camera.setViewOffset(viewW, viewH, viewW / 2 - px, viewH / 2 - py, viewW, viewH);
  camera.updateProjectionMatrix();
}

async function main() {
  const background = parseBackground(params.get("background"));
  const [THREE, { SparkRenderer, SplatMesh }, { OrbitControls }] = await Promise.all([
    import("three"), import("@sparkjsdev/spark"), import("three/addons/controls/OrbitControls.js")]);
  mark("modules");

  const [manifest, camerasDoc, transforms, plyBytes] = await Promise.all([
    loadJson("../MANIFEST.json", { optional: true }),
    loadJson("../cameras/cameras.json", { optional: true }),
    loadJson("../cameras/transforms.json", { optional: true }),
    loadBytes("../splat/splat.ply"),
  ]);
  mark("files");
  // the disclosure is shown whatever the manifest says or lacks
  const label = manifest?.ai_disclosure?.label;
  $("label-text").textContent = typeof label === "string" && label.trim() ? label : AI_LABEL;
  const subject = manifest?.subject?.id;
  $("subject").textContent = subject ? `subject ${subject}` : "";
  document.title = `${subject ? subject + ": " : ""}${$("label-text").textContent}`;

  const cams = Array.isArray(camerasDoc?.cameras) ? camerasDoc.cameras : [];
  const byId = new Map(cams.map((c) => [c.id, c]));
  const holdout = new Set(transforms?.twinstudio?.holdout ?? []);
  const exact = viewer.camera !== null;
  if (exact && !byId.has(viewer.camera)) {
    throw new Error(`camera=${viewer.camera}: no such camera in cameras/cameras.json` +
      (cams.length ? ` (it has ${cams.map((c) => c.id).join(", ")})` : " (the bundle has none)"));
  }

  const canvas = $("view");
  const renderer = new THREE.WebGLRenderer({ canvas, antialias: false, alpha: false, powerPreference: "high-performance" });
  const scene = new THREE.Scene();
  scene.background = new THREE.Color().setRGB(...background, THREE.SRGBColorSpace);  // byte = value * 255
  const camera = new THREE.PerspectiveCamera(45, 1, 0.01, 100);
  camera.up.set(0, 0, 1);
  scene.add(camera);
  camera.add(new THREE.DirectionalLight(0xffffff, 2.0));  // for the mesh; splats carry their own colour
  scene.add(new THREE.AmbientLight(0xffffff, 1.0));

  const spark = new SparkRenderer({ renderer, ...SPARK_OPTIONS });
  scene.add(spark);
  const splat = new SplatMesh({ fileBytes: plyBytes, fileName: "splat.ply", extSplats: true });
  scene.add(splat);
  try {
    await splat.initialized;
  } catch (e) {
    throw new Error(`splat/splat.ply: cannot be read as a Gaussian splat (${e?.message ?? e})`);
  }
  viewer.splats = splat.splats?.getNumSplats() ?? 0;
  mark("splat");
  splat.visible = params.get("splat") !== "0";
  $("show-splat").checked = splat.visible;

  let focus = rigFocus(THREE, cams);
  if (focus === null) focus = splat.getBoundingBox(true).getCenter(new THREE.Vector3());

  let viewW;
  let viewH;
  const controls = new OrbitControls(camera, canvas);
  controls.target.copy(focus);
  let rigCam = exact ? byId.get(viewer.camera) : null;
  let dirty = true;
  let stableRun = 0;
  let last = null;

  function size() {
    if (exact) {
      viewW = rigCam.intrinsics.width;
      viewH = rigCam.intrinsics.height;
      renderer.setPixelRatio(1);
    } else {
      viewW = window.innerWidth;
      viewH = window.innerHeight;
      renderer.setPixelRatio(window.devicePixelRatio);
    }
    renderer.setSize(viewW, viewH, true);
    const buf = renderer.getDrawingBufferSize(new THREE.Vector2());
    if (rigCam) {
      applyRigCamera(THREE, camera, rigCam, buf.x, buf.y);
    } else {
      camera.aspect = viewW / viewH;
      camera.updateProjectionMatrix();
    }
    dirty = true;
  }

  function showStatus() {
    $("status").textContent = `${viewer.splats.toLocaleString("en")} Gaussians` +
      (rigCam ? `, camera ${rigCam.id} (${rigCam.intrinsics.width}x${rigCam.intrinsics.height})` : ", orbit");
  }

  function useCamera(id) {
    rigCam = id ? byId.get(id) : null;
    showStatus();
    if (rigCam) {
      size();
      const axis = camera.getWorldDirection(new THREE.Vector3());
      const along = focus.clone().sub(camera.position).dot(axis);
      controls.target.copy(camera.position).addScaledVector(axis, Math.max(along, 0.1));  // orbit from here
    } else {
      camera.clearViewOffset();
      camera.fov = 45;
      size();
    }
    dirty = true;
  }

  const picker = $("camera");
  for (const c of cams) {
    const opt = document.createElement("option");
    opt.value = c.id;
    opt.textContent = holdout.has(c.id) ? `${c.id} (held out)` : c.id;
    picker.append(opt);
  }
  picker.addEventListener("change", () => useCamera(picker.value));
  if (exact) {
    picker.value = viewer.camera;
    controls.enabled = false;
  } else if (cams.length) {
    // start where the first rig camera stands, orbiting the subject
    rigCam = cams[0];
    size();
    rigCam = null;
    camera.clearViewOffset();
    camera.fov = 45;
    camera.lookAt(focus);
  } else {
    camera.position.copy(focus).add(new THREE.Vector3(0, -3, 0));
  }
  controls.addEventListener("start", () => {
    if (rigCam) {  // dragging leaves the rig camera for the orbit, from where it stands
      rigCam = null;
      picker.value = "";
      showStatus();
      camera.clearViewOffset();
      camera.aspect = viewW / viewH;
      camera.updateProjectionMatrix();
    }
  });
  controls.addEventListener("change", () => { dirty = true; });
  spark.onDirty = () => { dirty = true; };
  window.addEventListener("resize", () => { if (!exact) size(); });
  size();
  if (!exact) controls.update();

  let mesh = null;
  async function showMesh(on) {
    if (on && mesh === null) {
      const glb = await loadBytes("../geometry/mesh.glb", { optional: true });
      if (glb === null) {
        $("show-mesh").checked = false;
        $("show-mesh").disabled = true;
        $("show-mesh").parentElement.title = "this bundle has no geometry/mesh.glb";
        return;
      }
      const { GLTFLoader } = await import("three/addons/loaders/GLTFLoader.js");
      const gltf = await new GLTFLoader().parseAsync(glb.buffer.slice(glb.byteOffset, glb.byteOffset + glb.byteLength), "");
      mesh = gltf.scene;
      mesh.rotation.x = Math.PI / 2;  // the GLB's node turns studio z-up into glTF's y-up: undo it
      scene.add(mesh);
    }
    if (mesh) mesh.visible = on;
    dirty = true;
  }
  $("show-mesh").addEventListener("change", (e) => showMesh(e.target.checked).catch(fail));
  $("show-splat").addEventListener("change", (e) => { splat.visible = e.target.checked; dirty = true; });
  if (params.get("mesh") === "1") {
    $("show-mesh").checked = true;
    await showMesh(true);
  }

  const gl = renderer.getContext();
  let pixels = null;
  function readBack() {  // the drawing buffer as just rendered (same task: not yet cleared by compositing)
    const w = gl.drawingBufferWidth;
    const h = gl.drawingBufferHeight;
    const px = new Uint8Array(w * h * 4);
    gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, px);
    return { w, h, px };
  }
  function same(a, b) {
    if (!a || !b || a.w !== b.w || a.h !== b.h) return false;
    const x = new Uint32Array(a.px.buffer);
    const y = new Uint32Array(b.px.buffer);
    for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return false;
    return true;
  }
  viewer.snapshot = async () => {
    await viewer.ready;
    const { w, h, px } = pixels;
    const c = document.createElement("canvas");
    c.width = w;
    c.height = h;
    const img = new ImageData(w, h);
    for (let y = 0; y < h; y++) {  // WebGL's rows start at the bottom
      img.data.set(px.subarray((h - 1 - y) * w * 4, (h - y) * w * 4), y * w * 4);
    }
    c.getContext("2d").putImageData(img, 0, 0);
    return c.toDataURL("image/png");
  };

  let ready = false;
  function frame() {
    requestAnimationFrame(frame);
    if (!exact && !rigCam) controls.update();
    const settled = viewer.splats === 0 || !splat.visible ||
      (spark.activeSplats > 0 && !spark.sorting && !spark.sortDirty);
    if (settled) mark("sorted");
    if (!dirty && ready && settled) return;
    renderer.render(scene, camera);
    viewer.frames++;
    dirty = false;
    if (ready) return;
    if (!settled) {  // Spark is still loading or sorting: the image is empty or about to change
      stableRun = 0;
      last = null;
      return;
    }
    const now = readBack();
    stableRun = same(now, last) ? stableRun + 1 : 1;
    last = now;
    if (stableRun >= STABLE_FRAMES) {
      ready = true;
      pixels = now;
      viewer.readyMs = performance.now();
      mark("ready");
      showStatus();
      resolveReady(viewer);
    }
  }
  requestAnimationFrame(frame);
}

main().catch(fail);
