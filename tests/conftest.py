import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _GraphCheck:
    """What the CUDA-graph GPU tests share: a training step's gradients and a few Adam steps of a loss closure under
    optional bf16 autocast, and the criterion that graphed gradients lie within the spread of two eager runs."""

    @staticmethod
    def step_grads(params, loss_of, autocast):
        params = list(params)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of()
        loss.backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        return loss.detach(), grads

    @staticmethod
    def adam_losses(params, loss_of, steps, autocast, clip_norm=None):
        params = list(params)
        opt = torch.optim.Adam(params, lr=1e-3)
        losses = []
        for _ in range(steps):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_of()
            loss.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    @staticmethod
    def assert_within_eager_spread(names, first, others, graph, autocast):
        """``graph``'s gradients lie within 4x the spread of the eager runs: ``first`` against each run of ``others``
        (a list of runs), the largest difference per parameter, plus a floor. The scan sums dB and dC by atomic adds
        (and a gather's backward scatters with them), and the normalisation layers amplify those last bits upstream,
        so one run differs from the next chaotically: two or three eager runs can land bitwise together on a
        parameter while the graphed run, one more sample, does not (fp32, H200: up to 1e-3 of a parameter's gradient
        norm against an eager spread of 1e-8). Hence the floor: under autocast a share of the whole gradient's norm
        (bf16 rounding); in fp32 also 5e-3 of the parameter's own, 5x the largest such difference seen and far below
        what a wrong or stale gradient gives."""
        total = torch.cat([g.flatten() for g in first]).norm()
        for i, (name, a, g) in enumerate(zip(names, first, graph)):
            spread = max((run[i] - a).norm() for run in others)
            floor = 2e-2 * total if autocast else 1e-5 * total + 5e-3 * a.norm()
            assert (g - a).norm() <= 4 * spread + floor, name


@pytest.fixture
def graph_check():
    return _GraphCheck
