"""Strategies the offload does not compose with (they shard parameters: FSDP, FSDP2 through
``ModelParallelStrategy``, DeepSpeed) are refused at ``setup`` in one line that names the
strategy and its own CPU offload option; the others compose. Lightning refuses FSDP and
DeepSpeed on a CPU, so the check runs here against the strategy objects; the ``cuda`` test runs
an FSDP Trainer with the callback on a GPU."""

from __future__ import annotations

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)

from hydra_offload import OffloadCallback, OffloadError
from hydra_offload.integrations.strategies import check_strategy
from hydra_offload.models import DecoderLM, LitDecoderLM, random_tokens


def deepspeed() -> DeepSpeedStrategy:
    # Its constructor needs the deepspeed package; the check reads the class only.
    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)


class MyFSDP(FSDPStrategy):
    """A user's subclass is the same strategy."""


@pytest.mark.parametrize(
    ("make", "name", "advice"),
    [
        (FSDPStrategy, "FSDPStrategy", "FSDPStrategy(cpu_offload=True)"),
        (MyFSDP, "MyFSDP", "FSDPStrategy(cpu_offload=True)"),
        (ModelParallelStrategy, "ModelParallelStrategy", "offload_policy=CPUOffloadPolicy()"),
        (deepspeed, "DeepSpeedStrategy", "DeepSpeedStrategy(stage=3, offload_parameters=True)"),
    ],
    ids=["fsdp", "fsdp-subclass", "fsdp2", "deepspeed"],
)
def test_a_strategy_that_shards_parameters_is_refused_in_one_line(make, name, advice):
    with pytest.raises(OffloadError) as refused:
        check_strategy(make())
    message = str(refused.value)
    assert message.startswith(f"OffloadCallback cannot offload under {name}: ")
    assert advice in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "strategy",
    [SingleDeviceStrategy("cpu"), DDPStrategy(), DDPStrategy(start_method="spawn")],
    ids=["single-device", "ddp", "ddp-spawn"],
)
def test_strategies_that_keep_whole_replicas_compose(strategy):
    check_strategy(strategy)


def test_the_callback_refuses_at_setup_before_anything_is_built(monkeypatch):
    # A Trainer whose strategy reads as FSDP (Lightning builds no FSDP Trainer on a CPU):
    # the refusal comes from the callback's setup, before configure_model is wrapped.
    module = LitDecoderLM(DecoderLM(num_layers=4))
    callback = OffloadCallback({"prefetch": {"offload_group_size": 2}})
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    monkeypatch.setattr(type(trainer), "strategy", property(lambda self: FSDPStrategy()))
    before = [p.data_ptr() for p in module.parameters()]
    with pytest.raises(OffloadError, match="cannot offload under FSDPStrategy"):
        callback.setup(trainer, module, "predict")
    assert "configure_model" not in module.__dict__
    assert [p.data_ptr() for p in module.parameters()] == before


def test_with_offload_none_nothing_is_checked(monkeypatch):
    # The same FSDP-reading Trainer as above: with nothing to offload, setup says nothing.
    callback = OffloadCallback({})
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    monkeypatch.setattr(type(trainer), "strategy", property(lambda self: FSDPStrategy()))
    callback.setup(trainer, LitDecoderLM(DecoderLM(num_layers=2)), "predict")


@pytest.mark.cuda
def test_cuda_an_fsdp_trainer_with_the_callback_is_refused_before_anything_is_built():
    module = LitDecoderLM(DecoderLM(num_layers=4))
    callback = OffloadCallback({"prefetch": {"offload_group_size": 2}})
    trainer = Trainer(
        accelerator="cuda", devices=1, strategy="fsdp", callbacks=[callback], logger=False,
        enable_progress_bar=False, enable_checkpointing=False,
    )  # fmt: skip
    with pytest.raises(OffloadError, match="cannot offload under FSDPStrategy"):
        trainer.predict(module, random_tokens(vocab_size=1024, seq_len=8, samples=2))
    assert all(p.device.type == "cpu" for p in module.parameters())  # nothing was moved
