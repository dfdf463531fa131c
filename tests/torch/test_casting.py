"""lowbit.torch.cast_to_16_bit_precision: coreai-opt's casting contract on exported programs, checked op by op and on
the digits CNN and MiniLM (outputs within float16 tolerance of float32)."""

import pytest

torch = pytest.importorskip("torch")
from conftest import digits_split, digits_torch_model  # noqa: E402
from torch import nn  # noqa: E402

import lowbit.torch  # noqa: E402
from lowbit.torch.casting import cast_fp32_to_fp16, cast_int32_to_int16  # noqa: E402

aten = torch.ops.aten


class Contract(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.big = nn.Parameter(torch.tensor([1e5, 1.0]))  # beyond float16: stays float32, whole
        self.tiny = nn.Parameter(torch.tensor([-1e-9, 2.0]))  # below float16's subnormals: kept nonzero
        self.register_buffer("mask", torch.tensor([0.0, -3e38]))  # a sentinel: does not keep it float32

    def forward(self, x, i, j):
        y = self.linear(x).exp()
        z = y / self.big[:1] * 1e4 + self.tiny[:1] + self.mask[:1]
        return z, (i + j) * i, torch.nn.functional.embedding(i + j, self.linear.weight)


def _inputs():
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([3, 1], dtype=torch.int32), torch.tensor([4, 2], dtype=torch.int32)


def test_the_contract_op_by_op():
    torch.manual_seed(0)
    exported = torch.export.export(Contract().eval(), _inputs())
    want = exported.module()(*_inputs())
    assert lowbit.torch.cast_to_16_bit_precision(exported, ignored_ops=aten.exp) is exported  # in place
    dtypes = {k: v.dtype for k, v in exported.state_dict.items()}
    assert dtypes == {
        "big": torch.float32,
        "tiny": torch.float16,
        "linear.weight": torch.float16,
        "linear.bias": torch.float16,
        "mask": torch.float16,
    }
    assert float(exported.state_dict["tiny"][0]) == -(2.0**-24)
    nodes = list(exported.graph.nodes)
    exp = next(n for n in nodes if n.target == aten.exp.default)
    assert exp.meta["val"].dtype == torch.float32  # ignored: between casts
    assert exp.args[0].target == aten._to_copy.default and exp.args[0].kwargs["dtype"] == torch.float32
    inputs = {n.name: n.meta["val"].dtype for n in nodes if n.op == "placeholder"}
    assert (inputs["x"], inputs["i"], inputs["j"]) == (torch.float16, torch.int16, torch.int16)
    embedding = next(n for n in nodes if n.target == aten.embedding.default)
    assert embedding.args[1].meta["val"].dtype == torch.int32  # an index: back to int32 before use
    x, i, j = _inputs()
    got = exported.module()(x.half(), i.to(torch.int16), j.to(torch.int16))
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.int32
    torch.testing.assert_close(got[0].float(), want[0], rtol=2e-3, atol=2e-3)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2].float(), want[2].half().float())


def test_invalid_arguments_are_refused():
    with pytest.raises(TypeError, match=r"exported_program must be a torch\.export\.ExportedProgram, got Linear"):
        cast_fp32_to_fp16(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"exported_program must be a torch\.export\.ExportedProgram"):
        cast_int32_to_int16(None)
    exported = torch.export.export(nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(TypeError, match="ignored_ops must hold torch ops"):
        cast_fp32_to_fp16(exported, ignored_ops=["exp"])


def test_digits_cnn_in_16_bits():
    _, _, images, _ = digits_split()
    x = torch.from_numpy(images[:128]).float()
    exported = torch.export.export(digits_torch_model(), (x,))
    want = exported.module()(x)
    got = lowbit.torch.cast_to_16_bit_precision(exported).module()(x.half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-3 * float(want.abs().max()))
    assert torch.equal(got.float().argmax(1), want.argmax(1))


def test_minilm_in_16_bits(minilm_torch):
    model, tokenizer = minilm_torch

    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    batch = tokenizer(["weights made small", "a model that still runs on a phone"], padding=True, return_tensors="pt")
    args = (batch["input_ids"], batch["attention_mask"])
    exported = torch.export.export(Hidden(), args)
    want = exported.module()(*args)
    got = lowbit.torch.cast_to_16_bit_precision(exported).module()(*args)
    assert got.dtype == torch.float16
    assert all(v.dtype == torch.float16 for v in exported.state_dict.values() if v.is_floating_point())
    cosine = torch.nn.functional.cosine_similarity(got.float().flatten(1), want.flatten(1))
    assert float(cosine.min()) > 0.9999
    assert float((got.float() - want).abs().max()) < 0.05


class _Edges(nn.Module):
    """What the second reader found: a non-persistent float buffer, an int -> float op with no dtype argument."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("shift", torch.tensor([0.5, 1.0, 1.5, 2.0]), persistent=False)

    def forward(self, x, ids):
        return self.linear(x + self.shift) + self.linear(ids / 7)


def test_non_persistent_buffers_and_int_to_float_ops_are_cast_consistently():
    x, ids = torch.randn(2, 4), torch.arange(8, dtype=torch.int32).reshape(2, 4)
    exported = torch.export.export(_Edges().eval(), (x, ids))
    want = exported.module()(x, ids)
    lowbit.torch.cast_to_16_bit_precision(exported)
    assert exported.constants["shift"].dtype == torch.float16
    got = exported.module()(x.half(), ids)  # a division is no int16 arithmetic: the ids stay int32
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


def test_an_ignored_op_with_several_outputs_runs_in_float32_between_casts():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    exported = torch.export.export(model, (x,)).run_decompositions()
    want = exported.module()(x)
    lowbit.torch.cast_to_16_bit_precision(exported, ignored_ops=aten.native_layer_norm.default)
    norm = next(n for n in exported.graph.nodes if n.target == aten.native_layer_norm.default)
    assert norm.meta["val"][0].dtype == torch.float32
    got = exported.module()(x.half())
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)
