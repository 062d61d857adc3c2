// GITS cost matrix over float buffers: a blocked pair kernel for l1 / l2 and a moment kernel for dev.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "geosample/gits.hpp"

namespace geosample {
namespace gits {
namespace {

constexpr long kBlock = 1024;  // D elements per block: the block's points and directions stay in L2
                               // (2 x 61 x 4 KiB for float), and a SIMD lane sums kBlock / width
                               // terms in the input precision before the float64 add
constexpr long kGroup = 64;    // samples whose per-sample costs are kept before the ordered reduction

// ---- l1 / l2: every pair (i, j > i), one block of D at a time ------------------------------------

#if defined(__GNUC__)
#define GEOSAMPLE_INLINE inline __attribute__((always_inline))  // so the AVX2 copy below gets its own code
#else
#define GEOSAMPLE_INLINE inline
#endif

// For one sample and one block of K elements: sum[i * T + j] += sum_k |e_ijk|^p with
// e_ij = (x_i - x_j) + h_ij d_i (x_i - x_j first: exact for nearby points, and the error then
// scales with |x_i - x_j|, not |x_i|).  xr[t]: the block of point t; d: the block's directions [T-1][K].
// A 2 x 4 register tile: two start points i share each load of four later points j, and the k loop
// is a SIMD reduction.  Clamped duplicates at the edges are computed and not stored.
template <class S, bool Square>
GEOSAMPLE_INLINE void pair_block(const S* const* xr, const S* d, const S* h, int T, long K, double* sum) {
    auto mag = [](S e) { return Square ? e * e : std::abs(e); };
    for (int i = 0; i + 1 < T; i += 2) {
        const int i1 = std::min(i + 1, T - 2);
        const S *xa = xr[i], *da = d + i * K, *xb = xr[i1], *db = d + i1 * K;
        const S *ha = h + static_cast<long>(i) * T, *hb = h + static_cast<long>(i1) * T;
        for (int j = i + 1; j < T; j += 4) {
            const int j1 = std::min(j + 1, T - 1), j2 = std::min(j + 2, T - 1), j3 = std::min(j + 3, T - 1);
            const S *x0 = xr[j], *x1 = xr[j1], *x2 = xr[j2], *x3 = xr[j3];
            const S ha0 = ha[j], ha1 = ha[j1], ha2 = ha[j2], ha3 = ha[j3];
            const S hb0 = hb[j], hb1 = hb[j1], hb2 = hb[j2], hb3 = hb[j3];
            S a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
            for (long k = 0; k < K; ++k) {
                a0 += mag((xa[k] - x0[k]) + ha0 * da[k]), a1 += mag((xa[k] - x1[k]) + ha1 * da[k]);
                a2 += mag((xa[k] - x2[k]) + ha2 * da[k]), a3 += mag((xa[k] - x3[k]) + ha3 * da[k]);
                b0 += mag((xb[k] - x0[k]) + hb0 * db[k]), b1 += mag((xb[k] - x1[k]) + hb1 * db[k]);
                b2 += mag((xb[k] - x2[k]) + hb2 * db[k]), b3 += mag((xb[k] - x3[k]) + hb3 * db[k]);
            }
            const S a[4] = {a0, a1, a2, a3}, bs[4] = {b0, b1, b2, b3};
            for (int q = 0; q < 4 && j + q < T; ++q) {
                sum[i * T + j + q] += a[q];
                if (i1 > i && j + q > i1) sum[i1 * T + j + q] += bs[q];
            }
        }
    }
}

template <class S>
struct PairScratch {
    std::vector<const S*> xr;
    std::vector<S> d;
    explicit PairScratch(int T) : xr(T), d(kBlock * T) {}
};

// One sample's costs: cost[i * T + j] = |e_ij|_1 or |e_ij|_2 (i < j), block by block of D.
template <class S, bool Square>
struct PairKernel {
    static GEOSAMPLE_INLINE void run(const S* x, const S* den, const double* grid, const S* h, int T, long B,
                                     long D, long b, double* cost, PairScratch<S>* s) {
        std::fill(cost, cost + static_cast<long>(T) * T, 0.0);
        for (long k0 = 0; k0 < D; k0 += kBlock) {
            const long K = std::min(kBlock, D - k0);
            for (int t = 0; t < T; ++t) {
                s->xr[t] = x + (t * B + b) * D + k0;
                if (t + 1 == T) break;
                const S* xt = s->xr[t];
                const S* dr = den + (t * B + b) * D + k0;
                const double inv = 1.0 / grid[t];  // a multiply, not a divide, per element
                S* dt = s->d.data() + t * K;
                for (long k = 0; k < K; ++k) dt[k] = static_cast<S>((static_cast<double>(xt[k]) - dr[k]) * inv);
            }
            pair_block<S, Square>(s->xr.data(), s->d.data(), h, T, K, cost);
        }
        if (Square)
            for (long n = 0; n < static_cast<long>(T) * T; ++n) cost[n] = std::sqrt(cost[n]);
    }
};

// ---- dev: five dot products per point -------------------------------------------------------------

inline double clamp0(double v) { return v < 0 ? 0.0 : v; }  // rounding below 0 -> 0; NaN stays NaN

// One sample's signed deviation costs.  With c = x[T-1] - x[0], r_t = x[T-1] - x[t] and d_t:
// |P r|^2 = r.r - (r.c)^2 / c.c, <P r, P d> = r.d - (r.c)(d.c) / c.c, |P d|^2 = d.d - (d.c)^2 / c.c,
// and |P (r_i - h d_i)|^2 = |P r_i|^2 - 2 h <P r_i, P d_i> + h^2 |P d_i|^2.
template <class S>
struct DevKernel {
    static GEOSAMPLE_INLINE void run(const S* x, const S* den, const double* grid, int T, long B, long D, long b,
                                     double* cost, double* m) {
        const S* last = x + ((T - 1) * B + b) * D;
        const S* first = x + b * D;
        double cc = 0;
#pragma omp simd reduction(+ : cc)
        for (long k = 0; k < D; ++k) {
            const double c = static_cast<double>(last[k]) - first[k];
            cc += c * c;
        }
        for (int t = 0; t < T; ++t) {
            const bool has_d = t + 1 < T;  // the last point has no direction: d = 0 there
            const S* xr = x + (t * B + b) * D;
            const S* dr = has_d ? den + (t * B + b) * D : xr;
            const double inv = 1.0 / grid[t];
            double rr = 0, rc = 0, dd = 0, dc = 0, rd = 0;
#pragma omp simd reduction(+ : rr, rc, dd, dc, rd)
            for (long k = 0; k < D; ++k) {
                const double c = static_cast<double>(last[k]) - first[k];
                const double r = static_cast<double>(last[k]) - xr[k];
                const double d = has_d ? (static_cast<double>(xr[k]) - dr[k]) * inv : 0.0;
                rr += r * r, rc += r * c, dd += d * d, dc += d * c, rd += r * d;
            }
            m[5 * t + 0] = clamp0(rr - rc * rc / cc);  // |P r|^2
            m[5 * t + 1] = rd - rc * dc / cc;          // <P r, P d>
            m[5 * t + 2] = clamp0(dd - dc * dc / cc);  // |P d|^2
        }
        for (int i = 0; i + 1 < T; ++i)
            for (int j = i + 1; j < T; ++j) {
                const double h = grid[j] - grid[i];
                const double student = m[5 * i] - 2 * h * m[5 * i + 1] + h * h * m[5 * i + 2];
                cost[i * T + j] = std::sqrt(clamp0(student)) - std::sqrt(m[5 * j]);
            }
    }
};

// ---- the same kernels compiled for AVX2 + FMA where the CPU has them (chosen once, at run time) ----

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
template <class Kernel, class... Args>
__attribute__((target("avx2,fma"))) void run_avx2(Args... args) {
    Kernel::run(args...);
}
#endif

template <class Kernel, class... Args>
void run_best(Args... args) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2) return run_avx2<Kernel>(args...);
#endif
    Kernel::run(args...);
}

// ---- driver -----------------------------------------------------------------------------------------

void check(const void* x, const void* den, const double* grid, int T, long B, long D, const double* out) {
    if (!x || !den || !grid || !out) throw std::invalid_argument("cost_matrix: null buffer");
    if (T < 2 || B < 1 || D < 1)
        throw std::invalid_argument("cost_matrix needs T >= 2 points, B >= 1 samples and D >= 1 elements, got T=" +
                                    std::to_string(T) + ", B=" + std::to_string(B) + ", D=" + std::to_string(D));
    for (int t = 0; t < T; ++t)
        if (!(std::isfinite(grid[t]) && grid[t] > 0))
            throw std::invalid_argument("cost_matrix: grid sigmas must be finite and > 0, got " +
                                        std::to_string(grid[t]) + " at " + std::to_string(t));
}

template <class S>
void cost_matrix_impl(const S* x, const S* den, const double* grid, int T, long B, long D, Metric metric,
                      double* out, int threads) {
    check(x, den, grid, T, B, D, out);
    const long TT = static_cast<long>(T) * T;
    std::vector<S> h(TT);  // h[i * T + j] = grid[j] - grid[i] in the input precision
    for (int i = 0; i < T; ++i)
        for (int j = 0; j < T; ++j) h[i * T + j] = static_cast<S>(grid[j] - grid[i]);
    const long group = std::min(kGroup, B);
    const int nt = static_cast<int>(std::clamp<long>(
        threads > 0 ? threads : static_cast<long>(std::max(1u, std::thread::hardware_concurrency())), 1, group));
    std::vector<double> per(group * TT), total(TT, 0.0);
    auto work = [&](int tid, long g0, long gn) {
        PairScratch<S> s(metric == Metric::dev ? 1 : T);
        std::vector<double> m(5 * T);
        for (long n = tid; n < gn; n += nt) {
            double* cost = per.data() + n * TT;
            const long b = g0 + n;
            if (metric == Metric::dev)
                run_best<DevKernel<S>>(x, den, grid, T, B, D, b, cost, m.data());
            else if (metric == Metric::l2)
                run_best<PairKernel<S, true>>(x, den, grid, h.data(), T, B, D, b, cost, &s);
            else
                run_best<PairKernel<S, false>>(x, den, grid, h.data(), T, B, D, b, cost, &s);
        }
    };
    for (long g0 = 0; g0 < B; g0 += group) {
        const long gn = std::min(group, B - g0);
        std::vector<std::thread> pool;
        for (int tid = 1; tid < nt; ++tid) pool.emplace_back(work, tid, g0, gn);
        work(0, g0, gn);
        for (auto& th : pool) th.join();
        for (long n = 0; n < gn; ++n)  // in sample order, whatever the thread count
            for (long e = 0; e < TT; ++e) total[e] += per[n * TT + e];
    }
    const double inf = std::numeric_limits<double>::infinity();
    for (int i = 0; i < T; ++i)
        for (int j = 0; j < T; ++j) out[i * T + j] = i < j ? total[i * T + j] / static_cast<double>(B) : inf;
}

}  // namespace

Metric metric_from_name(const std::string& name) {
    if (name == "l1") return Metric::l1;
    if (name == "l2") return Metric::l2;
    if (name == "dev") return Metric::dev;
    throw std::invalid_argument("unknown metric '" + name + "'; valid: l1, l2, dev");
}

void cost_matrix(const float* x, const float* den, const double* grid, int T, long B, long D, Metric metric,
                 double* out, int threads) {
    cost_matrix_impl(x, den, grid, T, B, D, metric, out, threads);
}

void cost_matrix(const double* x, const double* den, const double* grid, int T, long B, long D, Metric metric,
                 double* out, int threads) {
    cost_matrix_impl(x, den, grid, T, B, D, metric, out, threads);
}

}  // namespace gits
}  // namespace geosample
