"""Public API: names, modules, backend selection, empty batches, and every input validation error."""

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from utils import asl_inputs, head_inputs, needs_triton

import dualcoop_kernels as dk
from dualcoop_kernels.dispatch import BackendRegistry
from dualcoop_kernels.head import HEAD_BACKENDS
from dualcoop_kernels.options import WTA_ALIASES, WTA_CHOICES, WTA_MODES, WTA_TRAINING_ALIASES
from dualcoop_kernels.reference import dualcoop_head_reference


def test_public_names():
    assert isinstance(dk.__version__, str) and dk.__version__
    for name in dk.__all__:
        assert getattr(dk, name) is not None
    for function in (dk.dualcoop_head, dk.asymmetric_loss, dk.split_signed_labels, dk.available_backends):
        assert function.__doc__ and function.__annotations__


KERNELS_ALONE = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[:2] in (["dualcoop_kernels", wing] for wing in ("model", "data", "training")):
            raise ImportError(f"{name} imported by the kernels' layer")
sys.meta_path.insert(0, Refuse())
import torch
import dualcoop_kernels as dk
features, texts = torch.randn(2, 7, 6, dtype=torch.float64), [torch.randn(5, 6, dtype=torch.float64) for _ in range(3)]
logits = dk.DualCoOpHead(wta="pos_softmax").double()(features, *texts)
loss = dk.asymmetric_loss(logits, torch.ones(2, 5), torch.ones(2, 5, dtype=torch.bool))
loss.backward()
print("ok", float(loss) > 0, dk.__version__)
try:
    dk.DualCoOpPlusPlus
except ImportError as error:
    print(error)
"""


def test_the_package_imports_the_kernels_layer_alone():
    """``import dualcoop_kernels`` and the head and loss run without the model, data and training
    wings (a subprocess that refuses them); the model comes on first use of ``dk.DualCoOpPlusPlus``."""
    finished = subprocess.run([sys.executable, "-c", KERNELS_ALONE], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.splitlines() == [
        f"ok True {dk.__version__}",
        "dualcoop_kernels.model imported by the kernels' layer",
    ]


def test_head_function_and_module_agree():
    features, te, tp, tn, _ = head_inputs(2, 7, 6, 5, dtype=torch.float32, requires_grad=False)
    head = dk.DualCoOpHead(wta="pos_softmax")
    assert head.log_spatial_temp.item() == 3.0 and head.log_spatial_temp.requires_grad
    out = head(features, te, tp, tn)
    assert out.shape == (2, 2, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, dk.dualcoop_head(features, te, tp, tn, head.log_spatial_temp, wta="pos_softmax"))
    out.sum().backward()
    assert head.log_spatial_temp.grad is not None and head.log_spatial_temp.grad.item() != 0
    assert "pos_softmax" in repr(head)


@pytest.mark.parametrize("authors, ours", list(WTA_ALIASES.items()))
def test_wta_accepts_the_authors_names(authors, ours):
    features, te, tp, tn, log_temp = head_inputs(2, 7, 6, 5, requires_grad=False)
    head = dk.DualCoOpHead(wta=authors)
    assert head.wta == ours
    expected = dk.dualcoop_head(features, te, tp, tn, log_temp, wta=ours)
    torch.testing.assert_close(dk.dualcoop_head(features, te, tp, tn, log_temp, wta=authors), expected, rtol=0, atol=0)


def test_the_authors_pos_norm_det_is_a_mode_and_a_frozen_temperature():
    """pos_norm_det is refused as a mode, with what to pass instead: pos_norm and freeze_temperature=True."""
    message = r"'pos_norm_det' .* is wta='pos_norm', freeze_temperature=True"
    with pytest.raises(ValueError, match=message):
        dk.dualcoop_head(**_head_args(), wta="pos_norm_det")
    with pytest.raises(ValueError, match=message):
        dk.DualCoOpHead(wta="pos_norm_det")
    assert set(WTA_CHOICES) == set(WTA_MODES) | set(WTA_ALIASES) | set(WTA_TRAINING_ALIASES)
    head = dk.DualCoOpHead(**WTA_TRAINING_ALIASES["pos_norm_det"], spatial_temp_init=2.5)
    assert not head.log_spatial_temp.requires_grad and head.log_spatial_temp.item() == 2.5
    assert "freeze_temperature=True" in repr(head)
    features, te, tp, tn, _ = head_inputs(2, 7, 6, 5, dtype=torch.float32)
    head(features, te, tp, tn).sum().backward()
    assert head.log_spatial_temp.grad is None and te.grad is not None


def test_log_spatial_temp_forms():
    features, te, tp, tn, _ = head_inputs(2, 5, 4, 3, requires_grad=False)
    expected = dk.dualcoop_head(features, te, tp, tn, torch.tensor(2.5, dtype=torch.float64))
    torch.testing.assert_close(dk.dualcoop_head(features, te, tp, tn, 2.5), expected)
    torch.testing.assert_close(
        dk.dualcoop_head(features, te, tp, tn, torch.tensor([2.5], dtype=torch.float64)), expected
    )


def test_non_contiguous_inputs():
    features, te, tp, tn, log_temp = head_inputs(3, 6, 5, 4, requires_grad=False)
    strided = features.transpose(0, 1).contiguous().transpose(0, 1)
    texts_t = [t.T.contiguous().T for t in (te, tp, tn)]
    assert not strided.is_contiguous() and not texts_t[0].is_contiguous()
    torch.testing.assert_close(
        dk.dualcoop_head(strided, *texts_t, log_temp), dk.dualcoop_head(features, te, tp, tn, log_temp)
    )


def test_loss_function_and_module_agree():
    logits, targets, mask = asl_inputs(3, 6, two_way=True)
    module = dk.AsymmetricLoss(gamma_neg=2.0, reduction="mean")
    torch.testing.assert_close(
        module(logits, targets, mask), dk.asymmetric_loss(logits, targets, mask, gamma_neg=2.0, reduction="mean")
    )
    assert "gamma_neg=2.0" in repr(module)


def test_numbers_may_be_one_element_tensors_or_numpy_numbers():
    features, te, tp, tn, log_temp = head_inputs(2, 5, 4, 3, requires_grad=False)
    expected = dk.dualcoop_head(features, te, tp, tn, log_temp, logit_scale=20.0, wta_gamma=50.0)
    got = dk.dualcoop_head(features, te, tp, tn, log_temp, logit_scale=torch.tensor(20.0), wta_gamma=np.float32(50.0))
    torch.testing.assert_close(got, expected)
    assert dk.DualCoOpHead(logit_scale=torch.tensor([20.0])).logit_scale == 20.0
    logits, targets, mask = asl_inputs(2, 3, two_way=True)
    torch.testing.assert_close(
        dk.asymmetric_loss(logits, targets, mask, clip=torch.tensor(0.05, dtype=torch.float64)),
        dk.asymmetric_loss(logits, targets, mask, clip=0.05),
    )
    with pytest.raises(ValueError, match="logit_scale is a constant and gets no gradient"):
        dk.dualcoop_head(features, te, tp, tn, log_temp, logit_scale=torch.tensor(20.0, requires_grad=True))


def test_meta_tensors_pass_the_checks_that_need_no_values():
    """On the meta device there are no values to check: shapes flow through, as for a model built
    on meta to count its memory."""
    features, te, tp, tn, log_temp = (t.to("meta") for t in head_inputs(2, 5, 4, 3, requires_grad=False))
    out = dk.dualcoop_head(features, te, tp, tn, log_temp)
    assert out.device.type == "meta" and out.shape == (2, 2, 3)
    targets, mask = dk.split_signed_labels(torch.zeros(2, 3, device="meta"))
    loss = dk.asymmetric_loss(out, targets, mask, reduction="mean")
    assert loss.device.type == "meta" and loss.shape == ()
    with pytest.raises(ValueError, match="logit_scale must be a number, got a meta tensor"):
        dk.dualcoop_head(features, te, tp, tn, log_temp, logit_scale=torch.tensor(20.0, device="meta"))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton())])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_public_head_computes_low_precision_in_float32(backend, dtype):
    inputs = head_inputs(2, 9, 16, 5, dtype=torch.float32, requires_grad=False)
    low = [t.to(dtype) for t in inputs[:4]] + [inputs[4]]
    expected = dualcoop_head_reference(*[t.float() for t in low]).to(dtype)
    got = dk.dualcoop_head(*low, backend=backend)
    assert got.dtype == dtype
    torch.testing.assert_close(
        got, expected, rtol=1e-2 if backend == "triton" else 0, atol=1e-2 if backend == "triton" else 0
    )


def test_split_signed_labels():
    labels = torch.tensor([[1, -1, 0], [0, 1, -1]])
    targets, mask = dk.split_signed_labels(labels)
    assert torch.equal(targets, torch.tensor([[1, 0, 0], [0, 1, 0]]))
    assert torch.equal(mask, torch.tensor([[True, True, False], [False, True, True]]))
    float_targets, _ = dk.split_signed_labels(labels.float())
    assert float_targets.dtype == torch.float32
    with pytest.raises(ValueError, match="labels"):
        dk.split_signed_labels(torch.tensor([[2, 0]]))
    with pytest.raises(ValueError, match="labels"):
        dk.split_signed_labels(torch.tensor([1, 0]))
    with pytest.raises(TypeError, match="labels"):
        dk.split_signed_labels(torch.tensor([[True, False]]))


def test_split_signed_labels_warns_on_what_looks_like_0_1_labels():
    with pytest.warns(UserWarning, match=r"no label is -1.*pass them to asymmetric_loss as targets directly"):
        _, mask = dk.split_signed_labels(torch.tensor([[1, 0, 1], [0, 0, 1]]))
    assert mask.sum() == 3  # as documented: 0 reads as unknown
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dk.split_signed_labels(torch.tensor([[1, 0, -1]]))
        dk.split_signed_labels(torch.zeros(0, 3))


@needs_triton()
def test_backend_selection():
    # the Triton head runs here in its interpreter, but "auto" keeps it for CUDA tensors
    assert dk.available_backends("dualcoop_head") == ["triton", "reference"]
    assert HEAD_BACKENDS.resolve("auto", torch.device("cpu")).name == "reference"
    assert HEAD_BACKENDS.resolve("auto", torch.device("cuda")).name == "triton"
    assert dk.available_backends("asymmetric_loss", "cpu")[-1] == "reference"  # the extension, once built
    features, te, tp, tn, log_temp = head_inputs(1, 3, 4, 2, requires_grad=False)
    auto = dk.dualcoop_head(features, te, tp, tn, log_temp, backend="auto")
    torch.testing.assert_close(auto, dualcoop_head_reference(features, te, tp, tn, log_temp))
    with pytest.raises(ValueError, match=r"unknown backend 'cuda-magic'.*'reference'"):
        dk.dualcoop_head(features, te, tp, tn, log_temp, backend="cuda-magic")
    with pytest.raises(ValueError, match="unknown backend"):
        dk.DualCoOpHead(backend="nope")
    with pytest.raises(ValueError, match=r"unknown backend.*'reference'"):
        dk.asymmetric_loss(*asl_inputs(2, 3, False), backend="nope")
    with pytest.raises(ValueError, match="op must be one of"):
        dk.available_backends("conv")
    with pytest.raises(ValueError, match=r"device must be a torch\.device or a name"):
        dk.available_backends("dualcoop_head", "tpu")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    assert dk.available_backends("dualcoop_head", "cpu") == ["reference"]
    features, te, tp, tn, log_temp = head_inputs(1, 3, 4, 2, requires_grad=False)
    with pytest.raises(ValueError, match=r"'triton'.*not available on cpu.*CUDA device.*TRITON_INTERPRET=1"):
        dk.dualcoop_head(features, te, tp, tn, log_temp, backend="triton")


def test_unavailable_backend_says_why():
    registry = BackendRegistry("some_op")
    registry.register("gpu-only", dualcoop_head_reference, unavailable_reason=lambda device: "needs a GPU")
    registry.register("reference", dualcoop_head_reference)
    assert registry.resolve("auto", torch.device("cpu")).name == "reference"
    with pytest.raises(
        ValueError, match=r"'gpu-only'.*not available on cpu.*needs a GPU.*available: \['auto', 'reference'\]"
    ):
        registry.resolve("gpu-only", torch.device("cpu"))


@pytest.mark.parametrize("wta", WTA_MODES)
def test_empty_batch(wta):
    features, te, tp, tn, log_temp = head_inputs(0, 5, 4, 3)
    out = dk.dualcoop_head(features, te, tp, tn, log_temp, wta=wta)
    assert out.shape == (0, 2, 3)
    out.sum().backward()
    assert torch.all(te.grad == 0)
    logits = torch.zeros(0, 2, 3, requires_grad=True)
    for reduction in ("sum", "mean"):
        assert dk.asymmetric_loss(logits, torch.zeros(0, 3), reduction=reduction).item() == 0.0
    assert dk.asymmetric_loss(logits, torch.zeros(0, 3), reduction="none").shape == (0, 3)


# Each case: (change to the valid inputs, error type, words the message must contain).
def _head_args():
    features, te, tp, tn, log_temp = head_inputs(2, 5, 4, 3, dtype=torch.float32, requires_grad=False)
    return dict(features=features, text_evidence=te, text_pos=tp, text_neg=tn, log_spatial_temp=log_temp)


HEAD_ERRORS = [
    (dict(features=torch.randn(5, 4)), ValueError, r"features must have shape B x N x D"),
    (dict(features=[[1.0]]), TypeError, r"features must be a torch.Tensor"),
    (dict(features=torch.randint(0, 3, (2, 5, 4))), TypeError, r"features must be a floating tensor"),
    (dict(features=torch.zeros(2, 5, 4, dtype=torch.bool)), TypeError, r"features must be a floating tensor"),
    (dict(features=torch.randn(2, 0, 4)), ValueError, r"features must have N >= 1"),
    (dict(text_pos=torch.randn(3, 4, 1)), ValueError, r"text_pos must have shape C x D"),
    (dict(text_neg=torch.randn(3, 6)), ValueError, r"text_neg must have shape C x 4"),
    (dict(text_evidence=torch.randn(7, 4)), ValueError, r"same C.*text_evidence.*7"),
    (
        dict(text_evidence=torch.randn(0, 4), text_pos=torch.randn(0, 4), text_neg=torch.randn(0, 4)),
        ValueError,
        r"C >= 1",
    ),
    (dict(text_pos=torch.randn(3, 4, dtype=torch.float64)), TypeError, r"share one dtype.*text_pos is torch.float64"),
    (dict(text_evidence=torch.randn(3, 4).to("meta")), ValueError, r"one device.*text_evidence on meta"),
    (dict(log_spatial_temp=torch.tensor([1.0, 2.0])), ValueError, r"log_spatial_temp must be a scalar"),
    (dict(log_spatial_temp=torch.tensor(float("nan"))), ValueError, r"log_spatial_temp must be finite"),
    (dict(log_spatial_temp=torch.tensor(float("inf"))), ValueError, r"log_spatial_temp must be finite"),
    (dict(log_spatial_temp=torch.tensor(3)), TypeError, r"log_spatial_temp must be a floating tensor"),
    (dict(log_spatial_temp="3.0"), TypeError, r"log_spatial_temp must be a 0-d floating tensor or a number"),
]


@pytest.mark.parametrize("change, error, message", HEAD_ERRORS)
def test_head_rejects_bad_input(change, error, message):
    args = {**_head_args(), **change}
    with pytest.raises(error, match=message):
        dk.dualcoop_head(**args)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(wta="max"), r"wta must be one of \('pos_norm', 'pos_softmax', 'pos_pure_softmax', .*'none'\)"),
        (dict(wta_gamma=float("nan")), r"wta_gamma must be a finite real number"),
        (dict(logit_scale="20"), r"logit_scale must be a finite real number"),
        (dict(logit_scale=0.0), r"logit_scale must be > 0"),  # every logit 0
        (dict(logit_scale=-20.0), r"logit_scale must be > 0"),  # presence and absence swapped
    ],
)
def test_head_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        dk.dualcoop_head(**_head_args(), **options)
    with pytest.raises(ValueError, match=message):
        dk.DualCoOpHead(**options)


def _asl_args():
    logits, targets, mask = asl_inputs(2, 3, two_way=True, dtype=torch.float32)
    return dict(logits=logits, targets=targets, mask=mask)


ASL_ERRORS = [
    (dict(logits=torch.randn(2, 3, 3)), ValueError, r"two-way logits must have shape B x 2 x C"),
    (dict(logits=torch.randn(6)), ValueError, r"logits must have shape B x C .* or B x 2 x C"),
    (dict(logits=np.zeros((2, 2, 3), dtype=np.float32)), TypeError, r"logits must be a torch.Tensor"),
    (dict(logits=torch.ones(2, 2, 3, dtype=torch.int64)), TypeError, r"logits must be a floating tensor"),
    (dict(targets=torch.zeros(2, 4)), ValueError, r"targets must have shape B x C = 2 x 3"),
    (dict(targets=torch.zeros(6)), ValueError, r"targets must have shape B x C = 2 x 3"),
    (dict(targets=torch.full((2, 3), 2.0), mask=None), ValueError, r"targets must be 0 or 1"),
    (dict(targets=-torch.ones(2, 3), mask=None), ValueError, r"targets must be 0 or 1"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, r"mask must have shape B x C = 2 x 3"),
    (dict(mask=torch.ones(2, 3)), TypeError, r"mask must be a bool tensor"),
    (dict(mask=torch.ones(2, 3, dtype=torch.bool, device="meta")), ValueError, r"one device.*mask on meta"),
]


@pytest.mark.parametrize("change, error, message", ASL_ERRORS)
def test_loss_rejects_bad_input(change, error, message):
    with pytest.raises(error, match=message):
        dk.asymmetric_loss(**{**_asl_args(), **change})


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(reduction="avg"), r"reduction must be one of \('sum', 'mean', 'none'\)"),
        (dict(gamma_neg=-1.0), r"gamma_neg must be >= 0"),
        (dict(clip=float("inf")), r"clip must be a finite real number"),
        (dict(clip=1.5), r"clip must be in \[0, 1\]"),  # would zero every negative's loss
        (dict(clip=-0.1), r"clip must be in \[0, 1\]"),
        (dict(eps=None), r"eps must be a finite real number"),
        (dict(eps=0.0), r"eps must be in \(0, 1\)"),
        (dict(eps=1.0), r"eps must be in \(0, 1\)"),
        (dict(gamma_pos="1"), r"gamma_pos must be a finite real number"),
        (dict(gamma_neg=torch.ones(2)), r"gamma_neg must be a finite real number .*one-element"),
        (dict(gamma_neg=torch.tensor(2.0, requires_grad=True)), r"gamma_neg is a constant and gets no gradient"),
    ],
)
def test_loss_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        dk.asymmetric_loss(**_asl_args(), **options)
    with pytest.raises(ValueError, match=message):
        dk.AsymmetricLoss(**options)


def test_logit_scale_default_is_e_cubed():
    assert dk.DualCoOpHead().logit_scale == pytest.approx(math.exp(3.0))


def test_every_name_the_api_reference_documents_has_a_docstring():
    """docs/reference.md renders the docstrings of the objects its ``::: path`` lines name and of their
    public members (mkdocs.yml's ``filters``, or a block's own ``options``), and mkdocstrings leaves out a
    member without a docstring, silently: every such function, class and method must have one."""
    import dataclasses
    import importlib
    import inspect
    import re
    from pathlib import Path

    import yaml

    pytest.importorskip("torchvision")  # the training settings' module needs the clip extra
    root = Path(__file__).resolve().parents[1]
    handler = yaml.safe_load((root / "mkdocs.yml").read_text())["plugins"]
    handler = next(p["mkdocstrings"] for p in handler if isinstance(p, dict) and "mkdocstrings" in p)
    defaults = handler["handlers"]["python"]["options"]
    page = (root / "docs" / "reference.md").read_text()
    blocks = re.findall(r"^::: ([\w.]+)\n((?:[ \t]+\S.*\n)*)", page, re.M)
    assert len(blocks) >= 10, "docs/reference.md documents (almost) nothing"

    def shown(name: str, options: dict) -> bool:  # mkdocstrings' rule: the last filter that matches decides
        if options.get("members") is not None and not isinstance(options["members"], bool):
            return name in options["members"]
        if options.get("members") is False:
            return False
        filters = [(re.compile(f.lstrip("!")), f.startswith("!")) for f in options.get("filters", [])]
        matches = [not exclude for regex, exclude in filters if regex.search(name)]
        return matches[-1] if matches else {exclude for _, exclude in filters} != {False}

    def resolve(path: str):
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                target = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError as error:
                if error.name != ".".join(parts[:cut]):  # a module it needs, not a name inside one
                    raise
                continue
            for attribute in parts[cut:]:
                target = getattr(target, attribute)
            return target
        raise AssertionError(f"docs/reference.md documents {path}, which does not import")

    missing, seen = [], 0

    def check(label: str, obj, options: dict) -> None:
        nonlocal seen
        seen += 1
        function = obj.__func__ if isinstance(obj, (classmethod, staticmethod)) else obj
        function = function.fget if isinstance(function, property) else function
        doc = (function.__doc__ or "").strip()
        if not doc or (dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}(")):  # the generated one
            missing.append(label)
        if inspect.ismodule(obj):
            members = {n: m for n, m in vars(obj).items() if getattr(m, "__module__", None) == obj.__name__}
        elif inspect.isclass(obj):
            members = vars(obj)  # its own members: inherited ones are not shown
        else:
            return
        for name, member in members.items():
            if not shown(name, options):
                continue
            routine = inspect.isroutine(member) or isinstance(member, (classmethod, staticmethod, property))
            if routine or inspect.isclass(member):
                check(f"{label}.{name}", member, options)

    for path, indented in blocks:
        options = dict(defaults, **((yaml.safe_load(indented) or {}).get("options") or {}))
        check(path, resolve(path), options)
    assert seen >= 40, f"only {seen} objects were checked: is the walk right?"
    assert not missing, f"{len(missing)} objects docs/reference.md documents have no docstring: {missing}"
