"""Issue 15: devices. Clients and the main server may compute on different devices; a separate
device means a model copy of the main server's own, which every merge reaches. CI has no GPU, so
the placement logic runs with two CPU device names (cpu and cpu:0 are distinct torch devices)."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.cli import main
from hsplitlora.config import RunConfig
from hsplitlora.errors import UsageError
from hsplitlora.placement import Placement, check_available, placement
from hsplitlora.rounds import run


def test_devices_default_to_device_and_may_differ():
    assert placement("cpu", None, None) == Placement(torch.device("cpu"), torch.device("cpu"))
    where = placement("cpu", None, "cuda:1", check=False)
    assert where.client == torch.device("cpu") and where.server == torch.device("cuda:1") and where.separate
    with pytest.raises(UsageError, match="server_device 'gpu' is not a device; use cpu, cuda, cuda:N or mps"):
        placement("cpu", None, "gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_missing_gpu_is_refused_before_anything_is_written(tmp_path, capsys):
    with pytest.raises(UsageError, match="torch sees 0 CUDA device"):
        check_available(torch.device("cuda"))
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny", "--server-device", "cuda", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "server_device cuda is not available" in err and "Traceback" not in err and not out.exists()


@pytest.mark.parametrize(
    "strategy, split_mode",
    [("hsplitlora", "standard"), ("splitlora", "standard"), ("splitlora", "u"), ("hetlora", "standard")],
)
def test_a_main_server_on_its_own_device_trains_exactly_as_one_shared_model(tmp_path, strategy, split_mode):
    def losses(name: str, **devices) -> list[float]:
        config = RunConfig(model="tiny", clients=3, budgets="30MB,40MB,60MB", rounds=2, local_steps=2, val_size=8,
                           strategy=strategy, split_mode=split_mode, output_dir=str(tmp_path / name), threads=1,
                           **devices)  # fmt: skip
        return [value for m in run(config).metrics for value in (m["train_loss"], m["val_loss"])]

    shared = losses("shared")
    apart = losses("apart", client_device="cpu", server_device="cpu:0")  # two copies, as on two devices
    assert apart == shared


def test_every_tensor_of_a_step_lies_on_its_role_s_device():
    from hsplitlora.config import RunConfig
    from hsplitlora.setup import fixed_federation

    federation = fixed_federation(RunConfig(model="tiny", clients=2, split_point=2, rank=4, val_size=8))
    engine = federation.engine
    engine.message_log = []
    engine.step_all()
    for message in engine.message_log:
        for value in vars(message).values():
            tensors = [value] if isinstance(value, torch.Tensor) else [getattr(value, "data", None)]
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor):
                    assert tensor.device == torch.device("cpu")
    for client in federation.clients:
        assert all(p.device == client.device for p in client.parameters())
    assert all(p.device == federation.server.device for cid in (0, 1) for p in federation.server.parameters(cid))
