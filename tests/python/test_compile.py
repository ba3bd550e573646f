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


def test_compile_dynamic_traces_once_for_every_length_and_batch():
    torch._dynamo.reset()  # the graphs counted are this test's (not frames cached by earlier tests)
    torch.manual_seed(2)
    gru = pnewton.GRU(3, 8, batch_first=True, method="quasi_deer").double()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(gru, dynamic=True, backend=backend)
    # (torch.compile specialises sizes 0 and 1 of its own accord: sizes from 2 on share a graph.)
    for T, B in ((5, 2), (9, 3), (17, 2), (33, 4)):
        x = torch.randn(B, T, 3, dtype=torch.float64)
        out, h = compiled(x)
        out_eager, h_eager = gru(x)
        torch.testing.assert_close(out, out_eager)
        torch.testing.assert_close(h, h_eager)
    assert len(graphs) == 1


def test_export_with_dynamic_length_and_batch():
    torch.manual_seed(3)
    lstm = pnewton.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    T, B = torch.export.Dim("T", min=2, max=1 << 20), torch.export.Dim("B", min=1, max=1 << 16)
    program = torch.export.export(lstm, (torch.randn(2, 10, 3, dtype=torch.float64),),
                                  dynamic_shapes={"input": {0: B, 1: T}})
    for shape in ((3, 25, 3), (1, 7, 3)):
        x = torch.randn(*shape, dtype=torch.float64)
        out, (h, c) = program.module()(x)
        out_eager, (h_eager, c_eager) = lstm(x)
        torch.testing.assert_close(out, out_eager)
        torch.testing.assert_close(c, c_eager)
