"""pnewton.GRU against torch.nn.GRU as a drop-in user meets it: the same 2-layer layer and
input, forward under no_grad, default options, median of 5 calls, interleaved twice.

    python benchmarks/bench_dropin.py THREADS
"""
import sys, time, statistics, torch, pnewton
torch.set_num_threads(int(sys.argv[1])); torch.manual_seed(0)
for B, T, D in ((1, 4096, 64), (16, 256, 32), (20, 35, 200)):
    ref = torch.nn.GRU(D, D, num_layers=2); ours = pnewton.from_torch(ref); x = torch.randn(T, B, D)
    def tm(m):
        with torch.no_grad():
            m(x); ts=[]
            for _ in range(5):
                t0=time.perf_counter(); m(x); ts.append(time.perf_counter()-t0)
        return statistics.median(ts)
    r = [tm(ref), tm(ours), tm(ref), tm(ours)]
    print(f"threads {sys.argv[1]} GRU 2 layers B={B} T={T} D={D}: torch.nn {1e3*(r[0]+r[2])/2:.1f} ms, pnewton {1e3*(r[1]+r[3])/2:.1f} ms, ratio {(r[1]+r[3])/(r[0]+r[2]):.1f}x")
