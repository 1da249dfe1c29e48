// Native CPU kernels of sj_parallel_conversion: the parallel conversion neuron (sjpc_native_fire_*)
// and the count domain's quantiser (sjpc_native_count_*), for float32 and float64.
//
// kernels/native_backend.py compiles this file with the host's C++ compiler into its private
// cache (keyed by a hash of this text) and calls the entry points through ctypes after checking
// every tensor it passes. Both kernels mirror the torch reference (kernels/torch_backend.py)
// operation by operation: a sequential sum in the input dtype, IEEE division and no fused
// multiply-add (the build passes -ffp-contract=off), so every implementation gives the same bits.
//
// No C++ exception crosses into C, where it would abort the interpreter: every entry point returns
// a Status and writes the exception's text into the caller's buffer, and the Python wrapper raises
// MemoryError, ValueError or RuntimeError from them.

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SJPC_COUNT_AVX2 1
#include <immintrin.h>
#endif

// What an entry point returns (the Python wrapper keeps the same table).
enum Status : int {
    kOk = 0,
    kNaNSeen = 1,           // fire: some neuron's time mean is NaN
    kNoMemory = -1,         // std::bad_alloc
    kInvalidArgument = -2,  // std::invalid_argument: arguments the kernel would misread
    kFailed = -3,           // any other exception
    kNotBuilt = -4,         // count: not compiled for this architecture
};

namespace {

// Neurons per block: the block's running sums, counts and spike values stay in cache while its
// T_in input rows are read and its T output rows written; rows of a few KiB keep the hardware
// prefetchers streaming.
constexpr int64_t kBlock = 4096;

// Outputs at least this large are written with non-temporal stores: they cannot stay in cache
// anyway, and bypassing it saves reading every output line before it is overwritten.
constexpr int64_t kStreamBytes = int64_t(1) << 24;

// The hot loops' functions start on a 64-byte boundary: where a loop falls relative to the
// instruction fetch blocks moved the fire kernel's single-thread time by 6 % on an AMD EPYC with
// identical instructions, so the speed should not depend on what else the file holds.
#if defined(__GNUC__)
#define SJPC_LOOP_ALIGN __attribute__((aligned(64)))
#else
#define SJPC_LOOP_ALIGN
#endif

// Counts are exact integers in float32 only up to 2^24, and the kernel counts steps in int32.
constexpr int kMaxT = 1 << 24;

// The arguments the Python wrapper has already checked, checked again where a wrong value would
// read or write out of bounds: a caller of the C entry points may be something else.
void check_args(int64_t M, int T_in, int T, int64_t inner, int64_t C, int threads) {
    if (M < 0) throw std::invalid_argument("M (neurons per step) must be >= 0, got " + std::to_string(M));
    if (T_in < 1 || T_in > kMaxT || T < 1 || T > kMaxT)
        throw std::invalid_argument("T and T_in must lie in [1, 2^24], got T=" + std::to_string(T) +
                                    ", T_in=" + std::to_string(T_in));
    if (C < 1 || inner < 1)
        throw std::invalid_argument("C and inner must be >= 1, got C=" + std::to_string(C) +
                                    ", inner=" + std::to_string(inner));
    // A dense step repeats its channel pattern every inner * C positions.
    if (C > 1 && M % (inner * C) != 0)
        throw std::invalid_argument("M=" + std::to_string(M) + " is not a multiple of inner * C = " +
                                    std::to_string(inner) + " * " + std::to_string(C));
    if (threads < 1) throw std::invalid_argument("threads must be >= 1, got " + std::to_string(threads));
}

// ---- Worker threads -------------------------------------------------------------------------------
// The caller passes torch.get_num_threads() as the thread count. Work is cut into at most that
// many parts; the calling thread runs parts too, and the others go to workers that live as long
// as the process: started on first need, never more than the largest count asked for less one,
// so a call costs a wake-up rather than thread starts. One parallel call at a time: a thread that
// calls in meanwhile runs its own parts. After fork() the child starts from an empty pool (the
// parent's workers do not exist there).
class Pool {
public:
    using Fn = void (*)(const void*, int64_t);

    static Pool& get() {
        static std::once_flag once;
        std::call_once(once, [] {
            instance = new Pool();  // never destroyed: workers may still wait on it at exit
            pthread_atfork(nullptr, nullptr, [] { instance = new Pool(); });
        });
        return *instance;
    }

    // fn(ctx, part) for every part in [0, parts); rethrows the first exception a part raised.
    void run(int64_t parts, Fn fn, const void* ctx) {
        std::unique_lock<std::mutex> busy(call_, std::try_to_lock);
        if (parts <= 1 || !busy.owns_lock()) {
            for (int64_t p = 0; p < parts; ++p) fn(ctx, p);
            return;
        }
        std::unique_lock<std::mutex> lk(m_);
        grow(parts - 1);
        job_ = Job{fn, ctx, parts};
        next_.store(0);
        error_ = nullptr;
        active_ = workers_;
        ++generation_;
        lk.unlock();
        wake_.notify_all();
        drain(Job{fn, ctx, parts});
        lk.lock();
        done_.wait(lk, [this] { return active_ == 0; });  // ctx lives on the caller's stack
        if (error_) std::rethrow_exception(error_);
    }

    int64_t workers() {
        std::lock_guard<std::mutex> lk(m_);
        return workers_;
    }

private:
    struct Job {
        Fn fn;
        const void* ctx;
        int64_t parts;
    };

    // Called with m_ held. A worker starts from the current generation, so it waits for the job
    // about to be posted rather than missing it. A thread that cannot be started (resource
    // limits) leaves its parts to the threads that exist.
    void grow(int64_t want) {
        while (workers_ < want) {
            try {
                std::thread(&Pool::work, this, generation_).detach();
            } catch (const std::system_error&) {
                return;
            }
            ++workers_;
        }
    }

    void drain(const Job& job) {
        try {
            for (int64_t p = next_.fetch_add(1); p < job.parts; p = next_.fetch_add(1)) job.fn(job.ctx, p);
        } catch (...) {
            std::lock_guard<std::mutex> lk(m_);
            if (!error_) error_ = std::current_exception();
            next_.store(job.parts);  // hand out no more parts
        }
    }

    void work(uint64_t seen) {
#if defined(__linux__)
        pthread_setname_np(pthread_self(), "sjpc_native");  // what top, gdb and /proc show
#endif
        std::unique_lock<std::mutex> lk(m_);
        for (;;) {
            wake_.wait(lk, [&] { return generation_ != seen; });
            seen = generation_;
            const Job job = job_;
            lk.unlock();
            drain(job);
            lk.lock();
            if (--active_ == 0) done_.notify_one();
        }
    }

    static Pool* instance;
    std::mutex call_, m_;
    std::condition_variable wake_, done_;
    Job job_{nullptr, nullptr, 0};
    std::atomic<int64_t> next_{0};
    std::exception_ptr error_;
    int64_t workers_ = 0, active_ = 0;
    uint64_t generation_ = 0;
};
Pool* Pool::instance = nullptr;

// body(part, begin, end) for the positions [0, M) cut into at most `threads` ranges of whole
// blocks, run on the pool.
template <typename Body>
void split(int64_t M, int threads, const Body& body) {
    const int64_t blocks = (M + kBlock - 1) / kBlock;
    const int64_t n = std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
    const int64_t per = (blocks + n - 1) / n * kBlock;
    const auto part = [&](int64_t j) { body(j, std::min(M, j * per), std::min(M, (j + 1) * per)); };
    using Part = decltype(part);
    Pool::get().run(n, [](const void* ctx, int64_t j) { (*static_cast<const Part*>(ctx))(j); }, &part);
}

// floor() for values the count formula can produce; written out so that the compiler can
// vectorise it on any x86-64 or ARM target. Exact: values of magnitude >= 2^(mantissa bits)
// are integers already, NaN and infinities pass through.
inline float sjpc_floor(float v) {
    if (!(std::fabs(v) < 8388608.0f)) return v;
    float t = (float)(int32_t)v;
    return t > v ? t - 1.0f : t;
}
inline double sjpc_floor(double v) {
    if (!(std::fabs(v) < 4503599627370496.0)) return v;
    double t = (double)(int64_t)v;
    return t > v ? t - 1.0 : t;
}

// Writes output row t for the n neurons of a block with non-temporal stores, from the first
// 16-byte aligned neuron on; returns where it stopped (the caller writes the rest). The values
// are those of the plain loop: on[i] where the neuron fires, off[i] elsewhere; off == nullptr
// means +0 everywhere (spike values that are finite and positive), which saves a load and two
// operations per vector.
#if defined(__SSE2__)
template <typename F>
inline int64_t write_streamed(F* ot, const int32_t* edge, const F* on, const F* off, int64_t n, int t, int late) {
    // Works on the values' bits (integer SSE2 operations), so one body serves float and double;
    // only the lanes per vector and the widening of the int32 firing masks differ.
    constexpr int64_t lanes = 16 / sizeof(F);
    const auto bits = [](const F* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); };
    int64_t i = 0;
    for (; i < n && (reinterpret_cast<uintptr_t>(ot + i) & 15); ++i)
        ot[i] = (late ? t >= edge[i] : t < edge[i]) ? on[i] : (off ? off[i] : (F)0);
    const __m128i tv = _mm_set1_epi32(late ? t + 1 : t);
    for (; i + lanes <= n; i += lanes) {
        __m128i e, fire;
        if constexpr (sizeof(F) == 4) {
            e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(edge + i));
        } else {
            e = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(edge + i));
        }
        fire = late ? _mm_cmpgt_epi32(tv, e) : _mm_cmpgt_epi32(e, tv);  // t >= e / t < e, all-ones lanes
        if constexpr (sizeof(F) == 8) fire = _mm_unpacklo_epi32(fire, fire);  // each mask to 64 bits
        __m128i v = _mm_and_si128(fire, bits(on + i));
        if (off) v = _mm_or_si128(v, _mm_andnot_si128(fire, bits(off + i)));
        _mm_stream_si128(reinterpret_cast<__m128i*>(ot + i), v);
    }
    return i;
}
#else
template <typename F>
inline int64_t write_streamed(F*, const int32_t*, const F*, const F*, int64_t, int, int) { return 0; }
#endif

template <typename F>
// x and out may be the same array (a neuron overwriting its input): a block's inputs are all
// read before its outputs are written, and threads own disjoint blocks, so no restrict on them.
SJPC_LOOP_ALIGN void fire_range(const F* x, F* out, const F* __restrict__ theta,
                const F* __restrict__ psi, const F* __restrict__ psi_da, const F* __restrict__ value,
                int64_t M, int T_in, int T, int64_t inner, int64_t C, int late, bool plain_zero,
                int64_t begin, int64_t end, int* nan_seen) {
    // On the heap: a block's buffers are too large for the stack of every thread that may call in.
    std::vector<F> acc(kBlock), on(kBlock), off(kBlock);
    std::vector<int32_t> edge(kBlock);
    const F tf = (F)T, tin = (F)T_in, zero = (F)0;
    const bool stream = (int64_t)T * M * (int64_t)sizeof(F) >= kStreamBytes;
    for (int64_t s = begin; s < end; s += kBlock) {
        const int64_t n = std::min(kBlock, end - s);
        const F* x0 = x + s;
        F* a = acc.data();
        for (int64_t i = 0; i < n; ++i) a[i] = x0[i];
        for (int t = 1; t < T_in; ++t) {
            const F* xt = x + (int64_t)t * M + s;
            for (int64_t i = 0; i < n; ++i) a[i] += xt[i];
        }
        // Channel of memory position s: positions advance the channel every `inner` elements.
        int64_t c = (s / inner) % C, r = s % inner;
        for (int64_t i = 0; i < n; ++i) {
            const F m = a[i] / tin;
            if (m != m) *nan_seen = 1;
            F k = sjpc_floor(((m + psi_da[c]) * tf + psi[c]) / theta[c]);
            k = k < zero ? zero : (k > tf ? tf : k);
            const int32_t ki = (k == k) ? (int32_t)k : 0;  // NaN: no spike
            edge[i] = late ? T - ki : ki;                    // late fires at t >= edge, early at t < edge
            on[i] = value[c];
            off[i] = zero * value[c];  // the torch backend multiplies 0/1 by the spike value
            if (++r == inner) { r = 0; if (++c == C) c = 0; }
        }
        for (int t = 0; t < T; ++t) {
            F* ot = out + (int64_t)t * M + s;
            const int32_t* ed = edge.data();
            const F* hi = on.data();
            const F* lo = off.data();
            int64_t i = stream ? write_streamed(ot, ed, hi, plain_zero ? nullptr : lo, n, t, late) : 0;
            if (late) {
                for (; i < n; ++i) ot[i] = t >= ed[i] ? hi[i] : lo[i];
            } else {
                for (; i < n; ++i) ot[i] = t < ed[i] ? hi[i] : lo[i];
            }
        }
    }
#if defined(__SSE2__)
    if (stream) _mm_sfence();  // streamed stores become visible before the pool reports the part done
#endif
}

template <typename F>
int fire(const F* x, F* out, const F* theta, const F* psi, const F* psi_da, const F* value,
         int64_t M, int T_in, int T, int64_t inner, int64_t C, int late, int threads) {
    check_args(M, T_in, T, inner, C, threads);
    bool plain_zero = true;  // 0 * value is +0 for every channel (finite, non-negative spike values)
    for (int64_t c = 0; c < C; ++c) {
        const F o = (F)0 * value[c];
        plain_zero = plain_zero && o == (F)0 && !std::signbit(o);
    }
    std::vector<int> nan_seen(std::max(threads, 1), 0);
    split(M, threads, [&](int64_t part, int64_t b, int64_t e) {
        fire_range<F>(x, out, theta, psi, psi_da, value, M, T_in, T, inner, C, late, plain_zero, b, e,
                      &nan_seen[part]);
    });
    return *std::max_element(nan_seen.begin(), nan_seen.end()) ? kNaNSeen : kOk;
}

// ---- The count domain's quantiser ---------------------------------------------------------------
// k = clip(floor(((m + psi_da) * T + psi) / theta), 0, T), times scale when given, in one pass over
// memory (x may be out). About a dozen operations per value: bound by instructions rather than
// memory, so it needs wide vectors to beat torch's separate (AVX-512) passes. It is built for
// AVX2 on x86-64 and used only where the CPU runs AVX2 (sjpc_native_count_ok); elsewhere the
// torch operations run. Lane width changes no value: each operation is IEEE-exact per lane.
#ifdef SJPC_COUNT_AVX2
// Vec<F>: the AVX2 operations of one dtype (S: the intrinsics' ps / pd suffix).
template <typename F> struct Vec;
#define SJPC_AVX2 __attribute__((target("avx2")))
#define SJPC_VEC(F, R, N, S)                                                                           \
    template <> struct Vec<F> {                                                                         \
        using V = R;                                                                                    \
        static constexpr int lanes = N;                                                                 \
        SJPC_AVX2 static V load(const F* p) { return _mm256_loadu_##S(p); }                             \
        SJPC_AVX2 static V set1(F v) { return _mm256_set1_##S(v); }                                     \
        SJPC_AVX2 static void store(F* p, V v) { _mm256_storeu_##S(p, v); }                             \
        SJPC_AVX2 static V mul(V a, V b) { return _mm256_mul_##S(a, b); }                               \
        /* clamp(floor(...), 0, T): hi where k > 0, else NaN kept and anything else +0 */              \
        SJPC_AVX2 static V quant(V v, V pd, V ps, V th, V tf) {                                         \
            const V k = _mm256_floor_##S(_mm256_div_##S(                                                \
                _mm256_add_##S(_mm256_mul_##S(_mm256_add_##S(v, pd), tf), ps), th));                    \
            const V hi = _mm256_min_##S(k, tf);                                                         \
            const V lo = _mm256_and_##S(_mm256_cmp_##S(k, k, _CMP_UNORD_Q), k);                         \
            return _mm256_blendv_##S(lo, hi, _mm256_cmp_##S(k, _mm256_setzero_##S(), _CMP_GT_OQ));     \
        }                                                                                               \
    };
SJPC_VEC(float, __m256, 8, ps)
SJPC_VEC(double, __m256d, 4, pd)

// One value, the same operations (the tails of the vector loops).
template <typename F>
inline F quant_one(F v, F pd, F ps, F th, F tf) {
    const F k = std::floor(((v + pd) * tf + ps) / th);
    return k > (F)0 ? (k < tf ? k : tf) : (k != k ? k : (F)0);
}

// n values sharing one channel's parameters (per == false) or each with its own (per == true).
template <typename F>
SJPC_AVX2 SJPC_LOOP_ALIGN void count_run(const F* x, F* out, int64_t n, const F* th, const F* ps,
                                               const F* pd, const F* sc, bool per, F tf) {
    using W = Vec<F>;
    const auto vt = W::set1(tf);
    int64_t i = 0;
    if (per) {
        for (; i + W::lanes <= n; i += W::lanes) {
            auto r = W::quant(W::load(x + i), W::load(pd + i), W::load(ps + i), W::load(th + i), vt);
            W::store(out + i, sc ? W::mul(r, W::load(sc + i)) : r);
        }
    } else {
        const auto vpd = W::set1(pd[0]), vps = W::set1(ps[0]), vth = W::set1(th[0]);
        const auto vsc = W::set1(sc ? sc[0] : (F)1);
        for (; i + W::lanes <= n; i += W::lanes) {
            auto r = W::quant(W::load(x + i), vpd, vps, vth, vt);
            W::store(out + i, sc ? W::mul(r, vsc) : r);
        }
    }
    for (; i < n; ++i) {
        const int64_t c = per ? i : 0;
        const F r = quant_one(x[i], pd[c], ps[c], th[c], tf);
        out[i] = sc ? r * sc[c] : r;
    }
}

// Positions [begin, end): channel (j / inner) % C; inner == 1 means channels fastest.
template <typename F>
void count_range(const F* x, F* out, const F* th, const F* ps, const F* pd, const F* sc, int T, int64_t inner,
                 int64_t C, int64_t begin, int64_t end) {
    const F tf = (F)T;
    for (int64_t j = begin; j < end;) {
        const int64_t c = (j / inner) % C;
        const bool per = inner == 1 && C > 1;
        const int64_t stop = std::min(end, per ? j - c + C : (j / inner + 1) * inner);
        count_run<F>(x + j, out + j, stop - j, th + c, ps + c, pd + c, sc ? sc + c : nullptr, per, tf);
        j = stop;
    }
}

template <typename F>
int count(const F* x, F* out, const F* th, const F* ps, const F* pd, const F* sc, int64_t M, int T, int64_t inner,
          int64_t C, int threads) {
    check_args(M, 1, T, inner, C, threads);
    split(M, threads, [&](int64_t, int64_t b, int64_t e) {
        count_range<F>(x, out, th, ps, pd, sc, T, inner, C, b, e);
    });
    return kOk;
}
#endif

}  // namespace

// fn() with every exception turned into a Status and its text copied into err (errlen bytes).
template <typename Fn>
int guarded(char* err, int64_t errlen, const Fn& fn) {
    const auto say = [&](const char* what) {
        if (err != nullptr && errlen > 0) {
            std::strncpy(err, what, (size_t)errlen - 1);
            err[errlen - 1] = '\0';
        }
    };
    try {
        return fn();
    } catch (const std::bad_alloc&) {
        say("out of memory");
        return kNoMemory;
    } catch (const std::invalid_argument& e) {
        say(e.what());
        return kInvalidArgument;
    } catch (const std::exception& e) {
        say(e.what());
        return kFailed;
    } catch (...) {
        say("unknown C++ exception");
        return kFailed;
    }
}

// The C entry points, one per dtype.
#ifdef SJPC_COUNT_AVX2
#define SJPC_COUNT_BODY(F) \
    return guarded(err, errlen, [&] { return count<F>(x, out, th, ps, pd, sc, M, T, inner, C, threads); });
#else
#define SJPC_COUNT_BODY(F) return kNotBuilt;
#endif
#define SJPC_ENTRIES(SUFFIX, F)                                                                            \
    int sjpc_native_fire_##SUFFIX(const F* x, F* out, const F* theta, const F* psi, const F* psi_da,      \
                                  const F* value, int64_t M, int T_in, int T, int64_t inner, int64_t C,    \
                                  int late, int threads, char* err, int64_t errlen) {                     \
        return guarded(err, errlen, [&] {                                                                 \
            return fire<F>(x, out, theta, psi, psi_da, value, M, T_in, T, inner, C, late, threads);        \
        });                                                                                               \
    }                                                                                                     \
    int sjpc_native_count_##SUFFIX(const F* x, F* out, const F* th, const F* ps, const F* pd, const F* sc,  \
                                   int64_t M, int T, int64_t inner, int64_t C, int threads, char* err,     \
                                   int64_t errlen) {                                                      \
        SJPC_COUNT_BODY(F)                                                                                \
    }

extern "C" {
int sjpc_native_count_ok() {
#ifdef SJPC_COUNT_AVX2
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}

// Worker threads started so far (they stay until the process exits).
int64_t sjpc_native_workers() { return Pool::get().workers(); }

// Raises one kind of exception inside guarded(), so that tests see each Status and its message
// reach Python: 0 std::bad_alloc, 1 std::invalid_argument, 2 std::runtime_error, else a non-std one.
int sjpc_native_raise(int kind, char* err, int64_t errlen) {
    return guarded(err, errlen, [&]() -> int {
        if (kind == 0) throw std::bad_alloc();
        if (kind == 1) throw std::invalid_argument("an invalid argument (test)");
        if (kind == 2) throw std::runtime_error("a runtime error (test)");
        throw kind;
    });
}

SJPC_ENTRIES(f32, float)
SJPC_ENTRIES(f64, double)
}
