"""pnewton layers inside torch.compile(fullgraph=True) and torch.export: no graph breaks,
results equal to eager, forward and backward (CPU)."""
import torch
from torch import nn

import pnewton


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = pnewton.GRU(3, 8, batch_first=True, method="quasi_deer")
        self.lstm = pnewton.LSTM(8, 4, batch_first=True, method="block_deer")
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        h, _ = self.gru(x)
        out, (h_n, c_n) = self.lstm(torch.relu(h))
        return self.head(out).squeeze(-1) + c_n[0].sum(-1, keepdim=True)


def make(seed=0):
    torch.manual_seed(seed)
    return Model().double(), torch.randn(2, 40, 3, dtype=torch.float64)


def test_compile_fullgraph_forward_and_backward_equal_eager():
    model, x = make()
    eager = model(x)
    grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    compiled_grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    for a, b in zip(compiled_grads, grads):
        torch.testing.assert_close(a, b)
    assert bool(model.gru.last_stats.converged.all())  # diagnostics still recorded


def test_export_equals_eager():
    model, x = make(1)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    # The layers stay pnewton ops in the exported graph (the stack, or its solves).
    assert {"pnewton.rnn_stack.default", "pnewton.newton_rnn.default"} & ops, ops
