import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import shared_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_segmentation_benchmark_quick_smoke(tmp_path):
    """The whole table, then the recipe-only part, on a few real X-rays: the shipped config cut to two teachers,
    one fusion rule and one epoch, since every stage runs but none needs to learn here."""
    shared_dataset("cxr_lungs")
    import segmentation_transfer

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "configs/benchmarks/cxr_lungs.yaml").read_text())
    cfg["data"] = str(root / cfg["data"])
    cfg["teachers"], cfg["fusions"] = cfg["teachers"][1:], [cfg["finetune_from"]]
    cfg["recipe"] = cfg["recipe"][:3]  # the later variants change only the fusion rule, covered in test_fusion
    cfg["quick"] = {"variants": [], "train": {"size": [64], "epochs": 1}, "scratch_train": {"epochs": 1},
                    "finetune": {"epochs": 2, "freeze_encoder_epochs": 1}}
    config = tmp_path / "cxr_lungs.yaml"
    config.write_text(yaml.safe_dump(cfg))
    argv = ["--config", str(config), "--quick", "--max-cases", "4", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]
    result = segmentation_transfer.main(argv)
    written = json.loads((tmp_path / "out" / "cxr_lungs.json").read_text())
    assert written["mode"] == "quick" and written["seeds"] == [0]
    rows = written["rows"]
    # 2 teachers, 2 single-teacher students, weighted and mean fused, online, fine-tuned, 3 baselines
    assert len(rows) == 2 + 2 + 2 + 1 + 1 + 3
    for row, entry in rows.items():
        assert 0.0 <= entry["dice_mean"] <= 1.0, row
    assert "labels vs transferal truth" in (tmp_path / "out" / "cxr_lungs.md").read_text()
    assert result["rows"].keys() == rows.keys()

    recipe = segmentation_transfer.main([*argv, "--recipe-only"])["rows"]
    assert list(recipe)[4:] == ["student <- fused vote (the default)", "student <- fused vote, teacher TTA (flip)",
                                f"student <- {cfg['teachers'][0]}, strong augmentation",
                                "student <- fused vote, noisy student, round 0",
                                "student <- fused vote, noisy student, round 1"]
    assert (tmp_path / "out" / "cxr_lungs_recipe.json").is_file()
    seed0 = tmp_path / "work" / "seed0"
    tta = json.loads((seed0 / "labels_fused_vote__teacher_TTA_(flip)" / "manifest.json").read_text())
    assert tta["fusion"] == "vote" and tta["tta"] == "flip"
    noisy = seed0 / "selftrain_fused_vote__noisy_student__round_1"
    relabel = json.loads((noisy / "round_1" / "labels" / "manifest.json").read_text())
    assert len(relabel["teachers"]) == 3 and relabel["tta"] == "flip"  # two teachers and the round-0 student
    assert json.loads((tmp_path / "out" / "cxr_lungs.json").read_text()) == written  # the whole table is kept

    # --resume with one recipe variant renamed and the student's ceiling added: the other rows are kept as
    # measured, the renamed and the new one run
    cfg["recipe"] = [*({**v, "name": "spatial augmentation"} if "teacher" in v else v for v in cfg["recipe"]),
                     {"name": "its ceiling", "truth": True}]
    config.write_text(yaml.safe_dump(cfg))
    # and --reuse-teachers: the teachers still in the work folder label the new row instead of being retrained
    weights = [seed0 / f"teacher{i}" / "model.safetensors" for i in range(2)]
    written_at = [w.stat().st_mtime_ns for w in weights]
    resumed = segmentation_transfer.main([*argv, "--recipe-only", "--resume", "--reuse-teachers"])["rows"]
    renamed = f"student <- {cfg['teachers'][0]}, spatial augmentation"
    ceiling = f"upper bound: {cfg['student']} on transferal true masks, its ceiling"
    assert list(resumed) == [*(row.replace("strong", "spatial") for row in recipe), ceiling]
    for row in (row for row in recipe if "strong" not in row):
        before, after = recipe[row]["per_seed"]["0"], resumed[row]["per_seed"]["0"]
        assert {k: v for k, v in after.items() if k != "retrained_dice"} == before, row
        assert ("retrained_dice" in after) == row.startswith("teacher"), row  # the new row's teachers, recorded
        if row.startswith("teacher"):
            assert after["retrained_dice"] == pytest.approx(before["dice"], abs=1e-6), row
    assert [w.stat().st_mtime_ns for w in weights] == written_at
    assert resumed[renamed]["seeds"] == resumed[ceiling]["seeds"] == 1
    assert (seed0 / f"student_{segmentation_transfer.folder_name(ceiling)}" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="only with --resume"):
        segmentation_transfer.main([*argv, "--recipe-only", "--reuse-teachers"])


@pytest.mark.parametrize("quick", [False, True])
def test_segmentation_configs_load(quick):
    """Every shipped benchmark config passes the variant check in both modes (the classification ones have none)."""
    import segmentation_transfer

    root = Path(__file__).resolve().parents[1]
    configs = sorted((root / "configs/benchmarks").glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        cfg = segmentation_transfer.load_config(path, quick)
        assert "quick" not in cfg and cfg["teachers"], path


@pytest.mark.parametrize("variant, message", [
    ({"name": "ceiling", "truht": True}, r"recipe\[1\] \(ceiling\): unknown key\(s\) truht"),
    ({"name": "x", "fusion": "votes"}, r"recipe\[1\] \(x\): unknown fusion 'votes'"),
    ({"name": "x", "teacher": 3}, r"recipe\[1\] \(x\): teacher 3 is not an index"),
    ({"fusion": "vote"}, r"recipe\[1\]: every entry needs a name"),
])
def test_segmentation_config_variant_errors(tmp_path, variant, message):
    import segmentation_transfer

    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"name": "bad", "teachers": ["a", "b"], "student": "c",
                                      "recipe": [{"name": "ok", "fusion": "trimmed-vote"}, variant]}))
    with pytest.raises(SystemExit, match=message):
        segmentation_transfer.load_config(config, quick=False)


def test_classification_benchmark_quick_smoke_and_resume(tmp_path):
    shared_dataset("kermany_cxr")
    import classification_transfer

    root = Path(__file__).resolve().parents[1]
    argv = ["--config", str(root / "configs/benchmarks/kermany_cxr.yaml"), "--quick", "--max-images", "8",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    result = classification_transfer.main(argv)
    rows = result["rows"]
    # 3 teachers; per budget scratch, transfer learning, KD from one and from three teachers, RoS-KD; 2 noise rows
    assert len(rows) == 3 + 5 + 2
    attacked = [row for row, entry in rows.items() if "pgd_accuracy_mean" in entry]
    assert len(attacked) == 3  # the plain, the single-teacher KD and the RoS-KD students
    for row, entry in rows.items():
        assert 0.0 <= entry["accuracy_mean"] <= 1.0, row
    assert json.loads((tmp_path / "out" / "kermany_cxr.json").read_text())["rows"] == json.loads(json.dumps(rows))

    weights = tmp_path / "work" / "seed0" / "teacher0" / "model.safetensors"
    trained_at = weights.stat().st_mtime_ns
    resumed = classification_transfer.main([*argv, "--resume"])  # the finished seed is read back, not retrained
    assert resumed["rows"] == rows and weights.stat().st_mtime_ns == trained_at


def test_throughput_benchmark_smoke(tmp_path):
    """benchmarks/throughput.py end to end on a few real X-rays with tiny teachers: every measure is present and
    nakt's fp32 labels are the naive loop's."""
    shared_dataset("cxr_lungs")
    import throughput

    result = throughput.main(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--epochs", "1",
                              "--size", "64", "--train-cases", "8", "--images", "6", "--repeats", "1",
                              "--scale-sizes", "8", "16", "--no-torchrun"])
    assert result["images"] == 6
    assert set(result["images_per_s"]) == {"naive", "nakt_fp32", "nakt_auto", "networks_only"}
    assert all(v > 0 for v in result["images_per_s"].values())
    assert result["agreement_fp32_naive"] >= 0.999  # the same teachers, the same preprocessing, fp32 both
    assert 0 < result["fraction_of_auto_matmul"] < result["networks_only_fraction_of_auto_matmul"] * 1.5
    assert [s["cases"] for s in result["scale"]] == [8, 16]
    assert len(list((tmp_path / "work" / "scale_16" / "labels" / "records").iterdir())) == 16
    assert result["torchrun_images_per_s"] is None  # left out: torchrun's labels are tested in test_label_scale
    name = throughput.result_name("cpu")  # one file per machine kind, named by its ISA level
    written = json.loads((tmp_path / "out" / f"{name}.json").read_text())
    assert written["targets"] == result["targets"] and "images/s" in (tmp_path / "out" / f"{name}.md").read_text()
    assert written["machine"]["isa"] == name.removeprefix("throughput_") and written["machine"]["cpu_flags"]


def test_fold_bench_smoke(tmp_path):
    """benchmarks/fold_bench.py at 64 px: both models timed, folded exactly, the CPU recorded."""
    import fold_bench

    result = fold_bench.main(["--size", "64", "--batch", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert result["batchnorm_folded"] == 30 and result["precisions"]["fp32"]["max_abs_prob_diff"] <= 1e-5
    assert all(m["seconds_per_batch"]["folded"] > 0 for m in result["precisions"].values())
    written = json.loads((tmp_path / "fold_bench.json").read_text())
    assert set(written["cpu"]["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}


def test_training_throughput_benchmark_smoke(tmp_path):
    """benchmarks/training_throughput.py end to end on a few real X-rays at 64 px: every measure is present."""
    shared_dataset("cxr_lungs")
    import training_throughput

    # the speed arms, then the memory runs on their own (each a fresh process per case count: the costly part)
    result = training_throughput.main(["--quick", "--epochs", "1", "--train-cases", "6", "--no-rss",
                                       "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    runs = result["per_seed"]["0"]
    assert set(runs) == {"nakt defaults", "plain fp32", "nakt fp32", f"plain {result['precision_auto']} (compute only)"}
    for run in runs.values():
        assert run["images_per_s"] > 0 and 0.0 <= run["val_dice"] <= 1.0 and run["images"] >= 4
    assert result["rss"] == [] and set(result["targets"]) == {"speedup", "dice_gap", "overhead"}
    name = training_throughput.result_name("cpu")
    assert "data-pipeline overhead" in (tmp_path / "out" / f"{name}.md").read_text()
    assert json.loads((tmp_path / "out" / f"{name}.json").read_text())["machine"]["isa"] in name
    memory = training_throughput.main(["--quick", "--rss-only", "--rss-arms", "defaults", "--train-cases", "6",
                                       "--scale-sizes", "4", "8", "--work", str(tmp_path / "work"),
                                       "--out", str(tmp_path / "out")])
    assert [len(r["by_cases"]) for r in memory["rss"]] == [2]  # 1x and 10x the cases
    assert all(v["rss_mb"] > 100 and v["tree_pss_mb"] > 100 for r in memory["rss"] for v in r["by_cases"].values())
    assert set(memory["targets"]) == {"memory_defaults"}
    assert "(defaults)" in (tmp_path / "out" / "training_throughput_memory.md").read_text()


def test_compile_summary_weighs_the_compiling_epoch_against_the_time_saved_per_image():
    """The --compile arm: 10 images in a first epoch of 12 s, then 10 images/s against the defaults' 5: 11 s of
    compiling (12 s less the 1 s those 10 images take compiled), 0.1 s saved per image -> pays from 110 images."""
    import training_throughput

    arm = lambda rate, first_s: {"images_per_s": 20 / (first_s + 1), "first_epoch_s": first_s,  # noqa: E731
                                 "first_epoch_images": 10, "later_images_per_s": rate}
    per_seed = {"0": {"nakt --compile": arm(10.0, 12.0), "nakt defaults": arm(5.0, 2.0)}}
    summary = training_throughput.compile_summary(per_seed, plain_rate=4.0)
    assert summary["compile_overhead_s"] == pytest.approx(11.0)
    assert summary["break_even_images"] == pytest.approx(110.0)
    assert summary["speedup_after_first_epoch"] == pytest.approx(2.5)
    assert summary["vs_defaults_after_first_epoch"] == pytest.approx(2.0)
    per_seed["0"]["nakt --compile"]["later_images_per_s"] = 4.0  # slower than eager: it never pays
    assert training_throughput.compile_summary(per_seed, plain_rate=4.0)["break_even_images"] is None


def test_training_throughput_on_cuda_without_a_gpu_is_one_line(monkeypatch):
    import torch
    import training_throughput

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=r"^training_throughput: --device cuda: no CUDA GPU here"):
        training_throughput.main(["--device", "cuda"])


def test_gpu_script_without_a_gpu_says_so_in_one_line_and_runs_nothing(tmp_path):
    """benchmarks/gpu.sh with no nvidia-smi, then with one (a stand-in) but no GPU torch can see."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
    fake = tmp_path / "bin"
    fake.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": "",
           "PATH": f"{fake}:/usr/bin:/bin"}
    for expected in ("nvidia-smi not found", "torch.cuda.is_available() is false"):
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1 and done.stdout == "", done
        assert len(done.stderr.strip().splitlines()) == 1 and expected in done.stderr, done.stderr
        (fake / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (fake / "nvidia-smi").chmod(0o755)
    assert not (tmp_path / "out").exists()


def test_pool_benchmark_smoke(tmp_path):
    """benchmarks/pool_transfer.py end to end: teachers on a few cxr_lungs cases label a pool of Kermany images,
    students of two sizes train on the pool's labels only, everything scored on cxr_lungs test."""
    shared_dataset("cxr_lungs")
    shared_dataset("kermany_cxr")
    import pool_transfer

    result = pool_transfer.main(["--quick", "--epochs", "1", "--max-cases", "4", "--pool-sizes", "6", "--samples",
                                 "12", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    rows = result["rows"]
    assert len(rows) == 3 + 2 and result["pool_images"] > 5000
    # the same sample budget for every student: 12 images from a pool of 6 are two epochs
    metrics = json.loads((tmp_path / "work" / "quick" / "seed0" / "student_small_6" / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and pool_transfer.student_epochs(12, 5) == 3
    assert all(0.0 <= e["mean"] <= 1.0 for e in rows.values())
    assert (tmp_path / "out" / "pool_transfer_quick.md").is_file()


def test_pool_benchmark_diagnosis_changes_one_thing_per_student(tmp_path):
    """--diagnose: students that each change one thing (the best teacher's labels alone, in-domain images, both,
    the two populations mixed, twice the budget); one role, named results."""
    shared_dataset("cxr_lungs")
    shared_dataset("kermany_cxr")
    import pool_transfer

    result = pool_transfer.main(["--quick", "--epochs", "1", "--max-cases", "4", "--pool-sizes", "6", "--samples",
                                 "12", "--students", "small", "--diagnose", "--name", "why", "--work",
                                 str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    diagnoses = [row for row in result["rows"] if row.startswith("diagnosis")]
    assert len(result["rows"]) == 3 + 1 + 5 and len(diagnoses) == 5
    seed = tmp_path / "work" / "quick" / "seed0"
    transferal = (seed.parent / "transferal.txt").read_text().split()
    label_sets = ("labels_best_teacher", "labels_in_domain", "labels_in_domain_best_teacher", "labels_mixed")
    manifests = {name: json.loads((seed / name / "manifest.json").read_text()) for name in label_sets}
    assert {name: (len(m["teachers"]), len(m["cases"])) for name, m in manifests.items()} == {
        "labels_best_teacher": (1, 6), "labels_in_domain": (3, 4), "labels_in_domain_best_teacher": (1, 4),
        "labels_mixed": (3, 10)}
    assert sorted(manifests["labels_in_domain"]["cases"]) == sorted(transferal)
    assert set(transferal) < set(manifests["labels_mixed"]["cases"])
    epochs = {name: len(json.loads((seed / name / "metrics.json").read_text())["history"])
              for name in ("diagnose_small_in_domain", "diagnose_small_mixed", "diagnose_small_long")}
    assert epochs == {"diagnose_small_in_domain": 3, "diagnose_small_mixed": 2, "diagnose_small_long": 4}
    assert (tmp_path / "out" / "why.json").is_file()


def test_recipe_resume_keeps_unchanged_variants_and_skips_the_human_row(tmp_path):
    import segmentation_transfer

    cfg = {"teachers": ["a", "b"], "student": "s", "train": {"epochs": 1}, "recipe": [{"name": "tta"}, {"name": "x"}]}
    score = {"dice": 0.5}
    rows = {"teacher a": {"per_seed": {"0": score}}, "student <- fused vote, tta": {"per_seed": {"0": score}},
            "student <- fused vote, x": {"per_seed": {"0": score}}, "human: second observer vs first": {"dice_mean": 1}}
    path = tmp_path / "d_recipe.json"
    path.write_text(json.dumps({"mode": "full, recipe-only", "config": cfg, "seeds": [0], "total_wall_s": 9,
                                "rows": rows}))
    changed = {**cfg, "recipe": [{"name": "tta"}, {"name": "x", "train": {"hard_labels": True}}]}
    kept, wall = segmentation_transfer.finished_seeds(path, "full, recipe-only", changed, False, recipe_only=True)
    assert kept == {0: {"teacher a": score, "student <- fused vote, tta": score}} and wall == 9
    other = {**cfg, "student": "t"}  # another student: nothing measured before applies
    assert segmentation_transfer.finished_seeds(path, "full, recipe-only", other, False, recipe_only=True) == ({}, 0)


def test_trained_as_matches_a_finished_run_by_its_training_record(tmp_path):
    """--reuse-teachers keeps a teacher only when its run finished with the very options asked for."""
    import segmentation_transfer

    cases = tmp_path / "train.txt"
    cases.write_text("a\n")
    run = tmp_path / "teacher0"
    run.mkdir()
    record = {"model": "smp:Unet/resnet18", "cases": str(cases), "seed": 0, "epochs": 20, "patch": [96]}
    (run / "config.json").write_text(json.dumps({"complete": True, "training": record}))
    asked = {**record, "cases": os.path.relpath(cases), "progress": False}  # relative paths and unrecorded keys
    assert segmentation_transfer.trained_as(run, asked)
    assert not segmentation_transfer.trained_as(run, {**asked, "seed": 1})
    assert not segmentation_transfer.trained_as(tmp_path / "missing", asked)
    (run / "config.json").write_text(json.dumps({"complete": False, "training": record}))  # interrupted
    assert not segmentation_transfer.trained_as(run, asked)


def test_deployment_summary_checks_only_the_students_it_ran():
    """A --rows run of the two small students: the deployment ratios are taken against the ensemble from the
    plain run's rows, the semi-supervised check is left out rather than failed, and the table says which
    training change the students had."""
    import deployment

    def row(dice, flops=None, latency=None):
        return {"dice": dice, "cost": {"flops": flops, "parameters": 1.0, "latency_s": latency,
                                       "onnx_latency_s": None}} if flops else {"dice": dice}

    seed = {"teacher a": row(0.80, 100.0, 1.0), "teacher b": row(0.70, 50.0, 1.0),
            deployment.ENSEMBLE: row(0.80, 150.0, 2.0),
            deployment.ROWS["small"]: row(0.78, 10.0, 0.5), deployment.ROWS["compact"]: row(0.76, 40.0, 3.0)}
    summary = deployment.summarise({"0": seed, "1": {**seed, deployment.ROWS["small"]: row(0.80, 10.0, 0.5)}})
    small, compact = (summary["checks"]["deployment"][deployment.ROWS[k]] for k in ("small", "compact"))
    assert small["dice_vs_ensemble"] == pytest.approx(0.79 / 0.80) and small["ensemble_flops_vs_student"] == 15
    assert small["met"] and not compact["met"]  # compact: 0.95x, 3.75x fewer FLOPs, slower
    assert summary["checks"]["deployment_target_met"] and "semi_target_met" not in summary["checks"]
    table = deployment.markdown({"dataset": "d", "mode": "full", "seeds": [0, 1], "command": "c",
                                 "machine": {"cpu_model": "m"}, "student_options": {"patches_per_case": 32},
                                 "summary": summary})
    assert "Students' training changed: `{'patches_per_case': 32}`" in table and "Semi-supervised" not in table
    # a student row that only seed 0 has (not yet run in seed 1) is left out of the means, and said so
    partial = deployment.summarise({"0": {**seed, deployment.ROWS["large"]: row(0.9)}, "1": seed})
    assert deployment.ROWS["large"] not in partial["mean"] and partial["partial_rows"] == [deployment.ROWS["large"]]


def test_a_rows_run_keeps_the_other_students_finished_rows(tmp_path, monkeypatch):
    """`--rows semi_filtered` on a seed whose small students finished with the same change: the seed's rows keep
    them (the results table needs every row in every seed) and only the asked-for student trains."""
    import deployment

    class Bench:  # what run_seed reads of segmentation_transfer.Bench, the training and scoring stubbed
        cfg, masks = {"teachers": ["smp:Unet/resnet18"]}, "masks"
        lists = {"transferal": "t.txt", "teacher_train": "tt.txt", "test": "test.txt"}
        io = {"images": "images", "channels": None}

        def __init__(self):
            self.trained = []

        def train(self, spec, masks, split, run, role, seed, **options):
            self.trained.append(run.name)

        def evaluate(self, out, hd95, model):
            return {"dice": 0.5}

    monkeypatch.setattr(deployment, "stable_cases", lambda *args, **kwargs: tmp_path / "kept.txt")
    monkeypatch.setattr(deployment, "discover_cases", lambda *args, **kwargs: ["first test case"])
    monkeypatch.setattr(deployment, "cost_of", lambda specs, case, onnx_run=None: {"flops": 1.0})
    done = {"teacher smp:Unet/resnet18": {"dice": 0.8}, deployment.ENSEMBLE: {"dice": 0.8},
            "fused transferal labels (vs transferal truth)": {"dice": 0.8}, deployment.ROWS["small"]: {"dice": 0.7}}
    bench = Bench()
    rows = deployment.run_seed(bench, 0, tmp_path, dict(done), students=("semi_filtered",), tag="epochs100")
    assert bench.trained == ["student_semi_filtered_epochs100"]
    assert rows == {**done, deployment.ROWS["semi_filtered"]: {"dice": 0.5, "train_s": None, "cost": {"flops": 1.0}}}


def test_online_students_learn_from_the_teachers_not_the_label_set(tmp_path, monkeypatch):
    """`deployment.py --online`: the students of the fused labels train with no stored targets, the seed's
    teachers running on their batches, fused per sample by `nakt label`'s default rule (the vote for 2+)."""
    import deployment

    class Bench:
        cfg, masks = {"teachers": ["smp:Unet/resnet18", "monai:UNet"]}, "masks"
        lists = {"transferal": "t.txt", "teacher_train": "tt.txt", "test": "test.txt"}
        io = {"images": "images", "channels": None}
        trained: dict = {}

        def train(self, spec, masks, split, run, role, seed, **options):
            self.trained[run.name] = (masks, options)

        def evaluate(self, out, hd95, model):
            return {"dice": 0.5}

    monkeypatch.setattr(deployment, "stable_cases", lambda *args, **kwargs: tmp_path / "kept.txt")
    monkeypatch.setattr(deployment, "discover_cases", lambda *args, **kwargs: ["first test case"])
    monkeypatch.setattr(deployment, "cost_of", lambda specs, case, onnx_run=None: {"flops": 1.0})
    done = {f"teacher {spec}": {"dice": 0.8} for spec in Bench.cfg["teachers"]}
    done |= {deployment.ENSEMBLE: {"dice": 0.8}, "fused transferal labels (vs transferal truth)": {"dice": 0.8}}
    bench = Bench()
    deployment.run_seed(bench, 0, tmp_path, done, {"epochs": 100}, ("small", "compact"), "online_epochs100",
                        online=True)
    assert sorted(bench.trained) == ["student_compact_online_epochs100", "student_small_online_epochs100"]
    masks, options = bench.trained["student_small_online_epochs100"]
    assert masks is None and options == {"teacher": [str(tmp_path / "teacher0"), str(tmp_path / "teacher1")],
                                         "teacher_mode": "mean", "fusion": "vote", "epochs": 100}


def test_nonempty_dice_scores_empty_and_foreground_cases_apart(tmp_path):
    """benchmarks/nonempty_dice.py on a deployment-style work folder (case lists per seed): the Dice over the
    cases with foreground and, apart, over the empty masks, written as a results file."""
    import nonempty_dice
    from PIL import Image

    data = tmp_path / "data"
    for folder in ("images", "masks"):
        (data / folder).mkdir(parents=True)
    for name, foreground in (("lesion", True), ("normal", False)):
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(data / "images" / f"{name}.png")
        mask = np.zeros((8, 8), np.uint8)
        mask[2:5, 2:5] = 255 if foreground else 0
        Image.fromarray(mask).save(data / "masks" / f"{name}.png")
    config = tmp_path / "config.yaml"
    config.write_text(f"name: toy\ndata: {data}\n")
    seed = tmp_path / "work" / "seed0"
    (seed / "cases").mkdir(parents=True)
    (seed / "cases" / "test.txt").write_text("lesion\nnormal\n")
    for run, dice in (("student", {"lesion": 0.6, "normal": 0.0}), ("labels", {"lesion": 0.1, "normal": 1.0})):
        (seed / f"eval_{run}").mkdir()
        (seed / f"eval_{run}" / "summary.json").write_text(json.dumps(
            {"per_case": [{"case": c, "dice": d} for c, d in dice.items()]}))
    out = tmp_path / "by_kind.json"
    nonempty_dice.main(["--config", str(config), "--work", str(tmp_path / "work"), "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["mean"] == {"nonempty": {"student": 0.6}, "empty": {"student": 0.0}}  # eval_labels: transferal
    assert written["test_cases"] == {"seed0": {"cases": 2, "empty": 1}}


def test_compile_gradients_distance_is_relative_l2_worst_tensor_and_overall():
    """benchmarks/compile_gradients.py's measure: per tensor the relative L2 distance (the worst one named) and
    over all gradients together; a tensor whose reference is zero is left out of the per-tensor worst; the logits'
    largest difference relative to the largest reference logit."""
    import compile_gradients
    import torch

    reference = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 10.0]), "zero": torch.zeros(2)}
    grads = {"a": torch.tensor([3.0, 4.5]), "b": torch.tensor([0.0, 10.0]), "zero": torch.tensor([0.0, 0.1])}
    logits = torch.tensor([-2.0, 4.0])
    d = compile_gradients.distance((logits + torch.tensor([0.0, 0.2]), grads), (logits, reference))
    assert d["worst_tensor"] == "a" and d["worst_relative_l2"] == pytest.approx(0.1)
    assert d["all_relative_l2"] == pytest.approx((0.5**2 + 0.1**2) ** 0.5 / 125**0.5)
    assert d["logits_relative_max"] == pytest.approx(0.05)
