"""`nakt report`: a static page that shows which labels of a label set to trust, and which cases a person should
check first.

The page (``out/index.html``, PNGs beside it in ``cases/`` and ``plots/``, every number in ``report.json``):

- the review queue: cases ranked by teacher disagreement (one minus the teachers' mean pairwise foreground Dice,
  then the share of pixels they do not all agree on), each shown with the fused outline (and every teacher's,
  when the label set kept ``teacher_probs``) over the image and the teachers' per-pixel agreement map; 3D cases as
  three orthogonal slices through the fused structure's centre;
- per teacher, STAPLE's label-free sensitivity and specificity (from the manifest for ``--fusion staple``, else
  estimated from stored teacher probabilities);
- plots: the distribution of teacher agreement, of the labels' Dice against `masks` when a truth is given, the
  training curves of `runs` (from their metrics.json), and accuracy against cost per case (`nakt.cost`) for the
  `runs` and the label set's ensemble of teachers: Dice against `masks` on the report's cases when a truth is
  given (by ``nakt evaluate --cost``, its summaries kept under ``runs/``), else each run's validation score.

Cases are read one at a time; only per-case numbers are kept, so the report scales with the number of cases.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from tqdm import tqdm

from nakt.config import at_least, check_options, option
from nakt.cost import case_cost
from nakt.errors import NaktError
from nakt.evaluate import EvaluateOptions, evaluate
from nakt.fusion import agreement_map, pairwise_dice, staple_estimates
from nakt.io import labelset, outputs, rundir
from nakt.io.dataset import discover_cases
from nakt.io.images import read_image, read_mask
from nakt.metrics import case_scores
from nakt.predict import load_checked
from nakt.preprocess import encode_labels

__all__ = ["REPORT", "ReportOptions", "plot_accuracy_vs_cost", "report"]

REPORT = outputs.OutputKind("report", "report.json", "nakt.report/", ("report.json", "index.html", "cases", "plots",
                                                                        "runs"))
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
FUSED = (255, 225, 25)
PANEL = 240  # longest side of a case panel, in pixels


@dataclass
class ReportOptions:
    """Options of `report` (flag names of ``nakt report``): the label set, its images, optional truth `masks`
    and training `runs`; `queue` cases of the review queue are drawn."""

    labels: str = option(help="label set written by nakt label", group="data")
    images: str = option(help="the label set's images", group="data")
    out: str = option(help="report folder (new or empty): index.html, cases/, plots/, report.json", group="output")
    runs: list[str] | None = option(None, "run directories: their training curves, and their accuracy against cost "
                                    "per case beside the teachers' ensemble", group="data")
    masks: str | None = option(None, "true masks, when there are any: the labels' Dice is plotted", group="data")
    cases: str | None = None
    channels: list[str] | None = None
    mask_file: str | None = None
    queue: int = option(24, "cases of the review queue drawn on the page", group="output")
    overwrite: bool = option(False, "replace an earlier nakt report", group="output")
    progress: bool = True

    def __post_init__(self) -> None:
        check_options(self, {"queue": at_least(1)})


def report(opts: ReportOptions) -> Path:
    """Write the report folder `opts.out` for the label set `opts.labels`; returns its path."""
    label_set = Path(opts.labels)
    if not labelset.is_label_set(label_set):
        raise NaktError(label_set, "is not a label set (no manifest.json)", "give a folder nakt label wrote")
    manifest = labelset.read_manifest(label_set)
    if manifest.get("task", "segmentation") != "segmentation":
        raise NaktError(label_set, "is a classification label set", "nakt report shows segmentation label sets")
    records = manifest.get("cases", {})
    found = discover_cases(opts.images, opts.masks, opts.cases, opts.channels, opts.mask_file)
    cases = [c for c in found if c.name in records]
    if not cases:
        raise NaktError(opts.images, f"holds none of the {len(records)} cases of {label_set}")
    runs = [Path(r) for r in opts.runs or []]
    for run in runs:
        rundir.read_metrics(run)  # a missing or foreign run fails now, before anything is written
    out = Path(opts.out)
    outputs.claim_output(out, REPORT, opts.overwrite)
    teachers = [t["spec"] for t in manifest.get("teachers", [])]
    values = [int(v) for v in manifest["label_values"]]
    orientation = manifest.get("orientation", "RAS")

    summaries = {}
    for case in tqdm(cases, desc="report", unit="case", disable=not opts.progress, leave=False):
        summaries[case.name] = _case_summary(case, records[case.name], label_set, values, orientation)
    queue = sorted(summaries, key=lambda n: (-summaries[n]["disagreement"], summaries[n]["pixel_agreement"], n))
    (out / "cases").mkdir(parents=True, exist_ok=True)
    by_name = {case.name: case for case in cases}
    for name in queue[:opts.queue]:
        summaries[name]["pictures"] = _draw_case(by_name[name], label_set, values, orientation, out / "cases",
                                                 len(teachers))
    costs = _cost_points(runs, manifest, label_set, [c for c in cases if c.mask is not None] or cases, opts, out)
    plots = _plots(summaries, runs, out / "plots", costs)
    quality = _teacher_quality(summaries, teachers)
    result = {"format": "nakt.report/1", "label_set": str(label_set), "images": str(opts.images),
              "truth": opts.masks, "teachers": quality, "classes": _class_table(manifest, label_set, queue),
              "queue": queue, "plots": plots, "cost": costs, "cases": summaries}
    with outputs.atomic_path(out / "index.html") as tmp:
        tmp.write_text(_page(result, opts.queue), encoding="utf-8")
    rundir.write_json(out / "report.json", result)
    return out


def _class_table(manifest: dict, label_set: Path, names: list[str]) -> list[dict]:
    """Per class of the label set: its value and name, the teachers that know it (all of them unless the set
    fused partial teachers, `nakt.labelspace`) and, where teacher probabilities are stored, the knowing
    teachers' mean pairwise Dice on it over the cases `names`."""
    values = [int(v) for v in manifest["label_values"]]
    class_names = manifest.get("class_names") or [str(v) for v in values]
    specs = [t["spec"] for t in manifest.get("teachers", [])]
    by_teacher = (manifest.get("label_mapping") or {}).get("by_teacher")
    knows = [set(t["classes"].values()) for t in by_teacher] if by_teacher else [set(values) for _ in specs]
    dice: dict[int, list[float]] = {c: [] for c in range(len(values))}
    for name in names:
        teacher_probs = labelset.read_probs(label_set, name, "teacher_probs")
        if teacher_probs is None:
            break  # stored for every case or for none
        hard = teacher_probs.argmax(1)
        for c, value in enumerate(values):
            knowing = [k for k, known in enumerate(knows) if value in known]
            if len(knowing) > 1:
                pairs = pairwise_dice((hard[knowing] == c).view(np.uint8), 2)
                dice[c].append(float(pairs[np.triu_indices(len(knowing), 1)].mean()))
    return [{"value": v, "name": n, "known_by": [s for s, known in zip(specs, knows) if v in known],
             "teachers_dice": float(np.mean(dice[c])) if dice[c] else None}
            for c, (v, n) in enumerate(zip(values, class_names))]


def _case_summary(case, record: dict, label_set: Path, values: list[int], orientation: str) -> dict:
    """The per-case numbers: teacher agreement, STAPLE quality where known, Dice against the truth if given."""
    agreement = record.get("agreement", {})
    summary = {"disagreement": 1.0 - agreement.get("pairwise_dice", 1.0),
               "pixel_agreement": agreement.get("pixel_agreement", 1.0), "staple": record.get("staple")}
    if summary["staple"] is None:  # not from the manifest: estimate it from stored teacher probabilities
        teacher_probs = labelset.read_probs(label_set, case.name, "teacher_probs")
        if teacher_probs is not None and len(teacher_probs) > 1:
            summary["staple"] = staple_estimates(teacher_probs)[1]
    if case.mask is not None:
        image = read_image(case.images, orientation=orientation)
        fused = read_mask(label_set / record["mask"], like=image)
        truth = read_mask(case.mask, like=image)
        summary["dice_vs_truth"] = case_scores(encode_labels(fused, values), encode_labels(truth, values, case.mask),
                                               len(values), hd95=False)["dice"]
    return summary


def _display(image: np.ndarray) -> np.ndarray:
    """``[C, *spatial]`` -> uint8 grey or RGB ``[*spatial, 3]``, intensities stretched between the 1st and 99th
    percentiles."""
    shown = image[:3] if image.shape[0] >= 3 else image[:1].repeat(3, axis=0)
    lo, hi = np.percentile(shown, [1, 99])
    return (np.clip((shown - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def _outline(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    from skimage.segmentation import find_boundaries

    rgb[find_boundaries(mask, mode="inner")] = colour


def _slices(array: np.ndarray, centre: tuple[int, ...]) -> list[tuple[str, tuple]]:
    """The views of a ``[..., *spatial]`` array: the image itself in 2D, three orthogonal slices in 3D."""
    if len(centre) == 2:
        return [("", (Ellipsis,))]
    return [(axis, (Ellipsis, *[slice(None) if d != k else centre[k] for d in range(3)]))
            for k, axis in enumerate(("axis 0", "axis 1", "axis 2"))]


def _draw_case(case, label_set: Path, values: list[int], orientation: str, folder: Path, k: int) -> list[str]:
    """PNGs of one case (per view: outlines over the image, and the agreement map); returns their paths
    relative to the report folder."""
    from matplotlib import colormaps

    image = read_image(case.images, orientation=orientation)
    fused = labelset.read_probs(label_set, case.name)
    teacher_probs = labelset.read_probs(label_set, case.name, "teacher_probs")
    agreement = labelset.read_probs(label_set, case.name, "agreement")
    if agreement is None and teacher_probs is not None and fused is not None:
        agreement = agreement_map(teacher_probs, fused)
    fused_labels = fused.argmax(0) if fused is not None else np.zeros(image.spatial_shape, int)
    foreground = np.argwhere(fused_labels > 0)
    centre = tuple(foreground.mean(0).astype(int)) if len(foreground) else tuple(s // 2 for s in fused_labels.shape)
    pictures = []
    for axis, view in _slices(image.array, centre):
        rgb = _display(image.array[view]).copy()
        for t in range(k if teacher_probs is not None else 0):
            _outline(rgb, teacher_probs[t].argmax(0)[view[1:]] > 0, COLOURS[t % len(COLOURS)])
        _outline(rgb, fused_labels[view[1:]] > 0, FUSED)
        panels = [rgb]
        if agreement is not None:
            panels.append((colormaps["viridis"](agreement[view[1:]])[..., :3] * 255).astype(np.uint8))
        picture = PILImage.fromarray(np.concatenate(panels, axis=1))
        scale = PANEL / max(rgb.shape[:2])  # small images are enlarged (pixels kept sharp), large ones reduced
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 PILImage.Resampling.NEAREST if scale > 1 else PILImage.Resampling.LANCZOS)
        name = f"{case.name}{'_' + axis.replace(' ', '') if axis else ''}.png"
        picture.save(folder / name)
        pictures.append(f"cases/{name}")
    return pictures


def _cost_points(runs: list[Path], manifest: dict, label_set: Path, cases: list, opts: ReportOptions,
                 out: Path) -> list[dict]:
    """Per run (and, with a truth, the label set's ensemble when all its teachers load here): its accuracy and
    cost per case (`nakt.cost.Cost` as JSON). With `opts.masks` the accuracy is the mean Dice on `cases`, from
    ``nakt evaluate --cost`` (the ensemble: its fused labels, and its teachers' cost as ``nakt label`` runs
    them); without, a run's best validation score from its metrics.json."""
    points = []
    names = out / "runs" / "cases.txt"  # what the runs are scored on: the report's cases
    if runs and opts.masks is not None:
        names.parent.mkdir(parents=True, exist_ok=True)
        names.write_text("".join(f"{c.name}\n" for c in cases), encoding="utf-8")
    for run in runs:
        if opts.masks is None:
            cost = case_cost([load_checked(str(run), None, "auto")], cases[0], "auto").to_json()
            points.append({"name": run.name, "accuracy": rundir.read_metrics(run).get("best_val_score"),
                           "measure": "validation score", "cost": cost})
            continue
        summary = evaluate(EvaluateOptions(model=str(run), images=opts.images, masks=opts.masks, cases=str(names),
                                           out=str(out / "runs" / run.name), channels=opts.channels, cost=True,
                                           hd95=False, overwrite=True, progress=False))
        points.append({"name": run.name, "accuracy": summary["mean"]["dice"], "measure": "Dice",
                       "cost": summary["cost"]})
    if opts.masks is None or not runs:
        return points
    try:
        teachers = [load_checked(t["spec"], None, "auto") for t in manifest.get("teachers", [])]
    except NaktError:  # a teacher made elsewhere (another framework, another machine's paths): no ensemble point
        return points
    summary = evaluate(EvaluateOptions(pred=str(label_set), images=opts.images, masks=opts.masks, cases=str(names),
                                       out=str(out / "runs" / "ensemble"), channels=opts.channels, hd95=False,
                                       overwrite=True, progress=False))
    points.append({"name": f"ensemble ({len(teachers)} teachers)", "accuracy": summary["mean"]["dice"],
                   "measure": "Dice", "cost": case_cost(teachers, cases[0], "auto").to_json()})
    return points


def _plots(summaries: dict, runs: list[Path], folder: Path, costs: list[dict]) -> list[str]:
    """Agreement and Dice histograms, the training curves of `runs`, and accuracy against FLOPs per case
    (`costs`); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=80)
        plt.close(fig)
        made.append(f"plots/{name}")

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist([1 - s["disagreement"] for s in summaries.values()], bins=20, range=(0, 1), color="#4477aa")
    ax.set(xlabel="teachers' mean pairwise Dice", ylabel="cases", title="teacher agreement")
    save(fig, "agreement.png")
    dices = [s["dice_vs_truth"] for s in summaries.values() if "dice_vs_truth" in s]
    if dices:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(dices, bins=20, range=(0, 1), color="#228833")
        ax.set(xlabel="fused labels' Dice against the truth", ylabel="cases", title="label quality")
        save(fig, "dice_vs_truth.png")
    for run in runs:
        history = rundir.read_metrics(run).get("history", [])
        fig, ax = plt.subplots(figsize=(5, 3))
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h.get("train_loss") for h in history], "o-", label="training loss")
        scores = [h.get("val_score") for h in history]
        if any(s is not None for s in scores):
            ax.plot(epochs, scores, "s-", label="validation score")
        ax.set(xlabel="epoch", title=run.name)
        ax.legend()
        save(fig, f"training_{len(made)}_{run.name}.png")
    if plot_accuracy_vs_cost(costs, folder / "accuracy_vs_cost.png"):
        made.append("plots/accuracy_vs_cost.png")
    return made


def _teacher_quality(summaries: dict, teachers: list[str]) -> list[dict]:
    """Per teacher, STAPLE's sensitivity and specificity averaged over the cases that have them."""
    known = [s["staple"] for s in summaries.values() if s.get("staple")]
    out = []
    for k, spec in enumerate(teachers):
        red, green, blue = COLOURS[k % len(COLOURS)]
        entry = {"spec": spec, "colour": f"#{red:02x}{green:02x}{blue:02x}", "cases": len(known)}
        if known:
            entry.update(sensitivity=float(np.mean([q["sensitivity"][k] for q in known])),
                         specificity=float(np.mean([q["specificity"][k] for q in known])))
        out.append(entry)
    return out


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _page(result: dict, shown: int) -> str:
    e = html.escape
    quality = "".join(
        f"<tr><td><span style='color:{t['colour']}'>&#9632;</span> {e(t['spec'])}</td>"
        + (f"<td>{t['sensitivity']:.3f}</td><td>{t['specificity']:.3f}</td>" if "sensitivity" in t
           else "<td colspan=2>not estimated (label with --fusion staple or --save-teacher-probs)</td>")
        + "</tr>" for t in result["teachers"])
    rows = []
    for rank, name in enumerate(result["queue"][:shown], 1):
        s = result["cases"][name]
        truth = f"{s['dice_vs_truth']:.3f}" if "dice_vs_truth" in s else "-"
        pictures = "".join(f"<img src='{e(p)}' alt='{e(name)}'>" for p in s.get("pictures", []))
        rows.append(f"<tr id='case-{rank}'><td>{rank}</td><td>{e(name)}</td><td>{1 - s['disagreement']:.3f}</td>"
                    f"<td>{s['pixel_agreement']:.4f}</td><td>{truth}</td><td>{pictures}</td></tr>")
    plots = "".join(f"<img src='{e(p)}' alt='{e(p)}'>" for p in result["plots"])
    costs = "".join(f"<tr><td>{e(p['name'])}</td><td>{_number(p['accuracy'], '.3f')} ({e(p['measure'])})</td>"
                    f"<td>{_number(p['cost']['parameters'], ',')}</td><td>{_number(p['cost']['gflops'], '.3f')}</td>"
                    f"<td>{p['cost']['latency_ms']:.1f}</td></tr>" for p in result["cost"])
    classes = "".join(f"<tr><td>{c['value']}</td><td>{e(c['name'])}</td><td>{e(', '.join(c['known_by']))}</td>"
                      f"<td>{'-' if c['teachers_dice'] is None else format(c['teachers_dice'], '.3f')}</td></tr>"
                      for c in result["classes"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>nakt report: {e(result['label_set'])}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}} img{{margin:2px}}</style></head>
<body><h1>Which labels to trust: {e(result['label_set'])}</h1>
<p>{len(result['cases'])} cases. Outlines: fused labels in yellow{', each teacher in its colour' if quality else ''};
beside each image, the share of teachers agreeing with the fused label (dark: disagreement).</p>
<h2>Teachers (label-free quality, STAPLE)</h2>
<table><tr><th>teacher</th><th>sensitivity</th><th>specificity</th></tr>{quality}</table>
<h2>Classes: which teacher knew what</h2>
<table><tr><th>value</th><th>name</th><th>known by</th><th>knowing teachers' pairwise Dice</th></tr>{classes}</table>
<h2>Plots</h2>{plots}
{'<h2>Cost per case</h2><table><tr><th>model</th><th>accuracy</th><th>parameters</th><th>GFLOPs</th>' +
 '<th>latency ms</th></tr>' + costs + '</table>' if costs else ''}
<h2>Review queue: most disputed first</h2>
<table><tr><th>rank</th><th>case</th><th>teachers' pairwise Dice</th><th>pixel agreement</th>
<th>Dice vs truth</th><th>views</th></tr>{''.join(rows)}</table>
</body></html>
"""


def plot_accuracy_vs_cost(points: list[dict], path: Path) -> bool:
    """Accuracy against GFLOPs per case (log scale), one labelled point per model, ensembles as stars; `points`
    are ``{"name", "accuracy", "measure", "cost": {"gflops"}}`` (`nakt.cost.Cost.to_json`). Returns whether
    any point had both numbers (nothing is drawn otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counted = [p for p in points if p["cost"]["gflops"] is not None and p["accuracy"] is not None]
    if not counted:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for point in counted:
        ensemble = point["name"].startswith("ensemble")
        ax.scatter(point["cost"]["gflops"], point["accuracy"], marker="*" if ensemble else "o",
                   s=120 if ensemble else 40, color="#cc3311" if ensemble else "#4477aa")
        ax.annotate(point["name"], (point["cost"]["gflops"], point["accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set(xlabel="GFLOPs per case", ylabel=counted[0]["measure"], title="accuracy against cost")
    fig.savefig(path, dpi=80, bbox_inches="tight")  # grows the canvas to the labels instead of shrinking the axes
    plt.close(fig)
    return True
