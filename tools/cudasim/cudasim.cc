/* cudasim.cc - the CUDA runtime and the cuBLAS GEMM that pdserve uses, on the CPU.
 *
 * Built with -DPD_CUDA_SIM=ON (tools/cudasim/README.md): the CUDA backend's host code
 * and kernels then run unchanged on a machine without a GPU, so that CI exercises their
 * logic: index arithmetic, barriers and warp shuffles, block tables, graph capture and
 * replay, IPC mappings between processes. It says nothing about speed, and the
 * arithmetic is the CPU's (no FMA contraction, glibc's expf), so results agree with a
 * GPU's within the kernels' stated error bounds, not bit for bit.
 *
 * What it checks that a GPU would also refuse or break on:
 * - launch configurations (block size, grid limits, dynamic shared memory above
 *   48 KiB without the cudaFuncSetAttribute opt-in, or above the sm_90 limit);
 * - every pointer argument of a kernel lies in memory a kernel may read (device,
 *   pinned or registered host memory, an IPC mapping), not pageable host memory;
 * - __syncthreads and the *_sync warp operations: every thread or named lane must
 *   arrive, the lanes of one warp operation must agree on it; otherwise the launch
 *   fails (a deadlock on a GPU) with a message naming the kernel's launch site;
 * - warp-synchronous code without a barrier: a block's threads run one at a time
 *   from one barrier to the next, so a thread reading what another writes without a
 *   barrier in between sees the old value;
 * - cp.async copies land only at cp_async_wait_all (the destination reads as NaN
 *   bytes until then);
 * - calls a capturing stream forbids (synchronous copies, allocation,
 *   synchronisation): they fail and invalidate the capture, as on a GPU;
 * - device memory starts as 0xff bytes (NaN as float) and each allocation ends just
 *   before an inaccessible page, so reads of unwritten memory or past the end show.
 * Errors are sticky after a failed kernel (as after a GPU trap).
 *
 * Execution: every call runs at once on the calling thread (a stream's work is in
 * order; streams are not concurrent), under one lock (one device). A block's threads
 * are fibers (a small context switch below, ucontext elsewhere), blocks run in order.
 * The switch keeps the callee-saved registers only: the floating-point control words
 * (MXCSR, x87) are the process's, which nothing here changes. */
#include "cuda_runtime.h"
#include "cublas_v2.h"
#include "cuda_fp16.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace
{

/* ---------------------------------------------------------------- errors ---- */

std::recursive_mutex mu;
thread_local cudaError_t last_error = cudaSuccess;
cudaError_t sticky = cudaSuccess;
int device_count = -1;

cudaError_t note(cudaError_t e)
{
    if (e != cudaSuccess)
        last_error = e;
    return e;
}

void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void say(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "cudasim: %s\n", buf);
}

bool have_device()
{
    if (device_count < 0) {
        const char *e = getenv("PD_CUDASIM_DEVICES");
        device_count = e ? atoi(e) : 1;
        if (device_count < 0)
            device_count = 0;
    }
    return device_count > 0;
}

/* ---------------------------------------------------------------- memory ---- */

const size_t kPage = 4096;
const size_t kArenaBytes = (size_t)64 << 30; /* address space, not memory */
const size_t kTotalMem = (size_t)16 << 30;   /* what the device reports */
const size_t kPoisonMax = (size_t)256 << 20;

enum Kind { DEVICE, PINNED, REGISTERED, IPC };
struct Region {
    size_t bytes;
    Kind kind;
    size_t span_off; /* DEVICE: the arena span (guard page included) */
    size_t span_bytes;
};

int arena_fd = -1;
char *arena = nullptr;
std::map<size_t, size_t> arena_free; /* offset -> bytes, coalesced */
std::map<uintptr_t, Region> regions; /* base -> region */
size_t device_used = 0;

bool arena_init()
{
    if (arena)
        return true;
    arena_fd = memfd_create("cudasim-device", MFD_CLOEXEC);
    if (arena_fd < 0 || ftruncate(arena_fd, (off_t)kArenaBytes) != 0)
        return false;
    void *p = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_NORESERVE, arena_fd, 0);
    if (p == MAP_FAILED)
        return false;
    arena = (char *)p;
    arena_free[0] = kArenaBytes;
    return true;
}

const Region *find_region(const void *p, uintptr_t *base)
{
    uintptr_t a = (uintptr_t)p;
    auto it = regions.upper_bound(a);
    if (it == regions.begin())
        return nullptr;
    --it;
    if (a >= it->first + it->second.bytes && !(it->second.bytes == 0 && a == it->first))
        return nullptr;
    if (base)
        *base = it->first;
    return &it->second;
}

/* The arena span [off, off + bytes) holds an allocation of n bytes ending 0-255 bytes
 * before its last page, which is made inaccessible. */
cudaError_t device_alloc(void **out, size_t n)
{
    if (!arena_init())
        return cudaErrorMemoryAllocation;
    size_t body = (n + 255) / 256 * 256;
    size_t span = (body + kPage - 1) / kPage * kPage + kPage;
    if (device_used + span > kTotalMem)
        return cudaErrorMemoryAllocation;
    for (auto it = arena_free.begin(); it != arena_free.end(); ++it) {
        if (it->second < span)
            continue;
        size_t off = it->first, rest = it->second - span;
        arena_free.erase(it);
        if (rest)
            arena_free[off + span] = rest;
        char *guard = arena + off + span - kPage;
        mprotect(guard, kPage, PROT_NONE);
        char *base = guard - body;
        if (n <= kPoisonMax)
            memset(base, 0xff, body);
        regions[(uintptr_t)base] = Region{n, DEVICE, off, span};
        device_used += span;
        *out = base;
        return cudaSuccess;
    }
    return cudaErrorMemoryAllocation;
}

void device_release(const Region &r)
{
    char *span = arena + r.span_off;
    mprotect(span + r.span_bytes - kPage, kPage, PROT_READ | PROT_WRITE);
    fallocate(arena_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)r.span_off,
              (off_t)r.span_bytes);
    device_used -= r.span_bytes;
    size_t off = r.span_off, bytes = r.span_bytes;
    auto next = arena_free.lower_bound(off);
    if (next != arena_free.end() && next->first == off + bytes) {
        bytes += next->second;
        arena_free.erase(next);
    }
    auto prev = arena_free.lower_bound(off);
    if (prev != arena_free.begin()) {
        --prev;
        if (prev->first + prev->second == off) {
            prev->second += bytes;
            return;
        }
    }
    arena_free[off] = bytes;
}

bool kernel_reachable(const void *p)
{
    if (!p)
        return true;
    return find_region(p, nullptr) != nullptr;
}

/* --------------------------------------------------------- streams, graphs ---- */

typedef std::function<void()> Work;

struct Stream {
    bool capturing = false;
    bool invalidated = false;
    std::thread::id capture_thread;
    std::vector<Work> nodes;
};
Stream legacy_stream;

Stream *stream_of(cudaStream_t s)
{
    return s ? (Stream *)(void *)s : &legacy_stream;
}

/* The stream this thread is capturing on, if any (ThreadLocal and Global modes alike:
 * an unsafe call from the capturing thread breaks its capture). */
std::vector<Stream *> live_streams;
Stream *capturing_here()
{
    for (Stream *s : live_streams)
        if (s->capturing && s->capture_thread == std::this_thread::get_id())
            return s;
    return nullptr;
}

/* An unsafe call during capture: fails and invalidates the capture. */
bool unsafe_in_capture(const char *what)
{
    Stream *s = capturing_here();
    if (!s)
        return false;
    if (!s->invalidated)
        say("%s while a stream is capturing: the capture is invalidated", what);
    s->invalidated = true;
    return true;
}

cudaError_t submit(cudaStream_t cs, Work w)
{
    Stream *s = stream_of(cs);
    if (s->capturing) {
        if (s->invalidated)
            return cudaErrorStreamCaptureInvalidated;
        s->nodes.push_back(std::move(w));
        return cudaSuccess;
    }
    if (sticky != cudaSuccess)
        return sticky;
    w();
    return sticky;
}

struct Graph {
    std::vector<Work> nodes;
};
struct GraphExec {
    std::vector<Work> nodes;
};

struct Event {
    double t = 0;
};

double now_ms()
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ------------------------------------------------------------------ fibers ---- */

#if defined(__x86_64__)
extern "C" void pd_sim_swap(void **save_sp, void *to_sp);
asm(R"(
    .pushsection .text
    .globl pd_sim_swap
    .hidden pd_sim_swap
    .type pd_sim_swap,@function
pd_sim_swap:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size pd_sim_swap,.-pd_sim_swap
    .popsection
)");
#endif

/* PD_CUDASIM_STATS=1: counts printed at exit */
unsigned long long n_launch, n_block, n_thread, n_pass;
void print_stats()
{
    fprintf(stderr,
            "cudasim: %llu launches, %llu blocks, %llu threads, %llu scheduler passes\n",
            n_launch, n_block, n_thread, n_pass);
}

const size_t kStack = 64 << 10;
const int kMaxThreads = 1024;

/* T_NEW: not started (no stack yet); a thread gets a stack when it starts and gives
 * it back when it ends, so threads that never wait reuse one warm stack. */
enum TState { T_NEW, T_RUN, T_BAR, T_WARP, T_DONE };
struct CpAsync {
    void *dst;
    const void *src;
};
struct SimThread {
    pd_sim::Thread t; /* first: pd_sim::cur points here */
    TState state;
    int op, param, width;
    unsigned mask;
    unsigned long long val, res;
    std::vector<CpAsync> cp;
    int stack;
#if defined(__x86_64__)
    void *sp;
#else
    ucontext_t uc;
#endif
};

struct Block {
    std::vector<SimThread> th;
    int n = 0;
    SimThread *running = nullptr;
#if defined(__x86_64__)
    void *sched_sp = nullptr;
#else
    ucontext_t sched;
#endif
    const std::function<void()> *body = nullptr;
    std::vector<char> dyn;
    char *stacks = nullptr;
    std::vector<int> free_stacks; /* LIFO: the warmest first */
    int resume_from = 0;          /* where the scheduler's pass goes on */
    int warp_end = 0;             /* the end of the running warp's threads */
    int ended_stack = -1;         /* the stack of a thread that just ended */
    bool failed = false;
};
Block blk;

void fiber_init(SimThread *t);

/* The running fiber stops (at a barrier, or done): the next runnable fiber of its warp
 * runs (straight from fiber to fiber), or the scheduler when none is left. */
void switch_to_sched()
{
    SimThread *t = blk.running;
    int i = (int)(t - blk.th.data()) + 1, end = blk.warp_end;
    while (i < end && blk.th[i].state != T_RUN && blk.th[i].state != T_NEW)
        i++;
    if (i < end &&
        t->state != T_DONE) { /* an ended thread's stack is freed by the scheduler */
        if (blk.th[i].state == T_NEW)
            fiber_init(&blk.th[i]);
        blk.running = &blk.th[i];
        pd_sim::cur = &blk.th[i].t;
#if defined(__x86_64__)
        pd_sim_swap(&t->sp, blk.th[i].sp);
#else
        swapcontext(&t->uc, &blk.th[i].uc);
#endif
        return;
    }
    blk.resume_from = i;
    if (t->state == T_DONE)
        blk.ended_stack = t->stack;
#if defined(__x86_64__)
    pd_sim_swap(&t->sp, blk.sched_sp);
#else
    swapcontext(&t->uc, &blk.sched);
#endif
}

void fiber_main()
{
    SimThread *t = blk.running;
    (*blk.body)();
    t->state = T_DONE;
    switch_to_sched();
    abort(); /* a finished fiber is never resumed */
}

void run_fiber(SimThread *t)
{
    blk.running = t;
    pd_sim::cur = &t->t;
#if defined(__x86_64__)
    pd_sim_swap(&blk.sched_sp, t->sp);
#else
    swapcontext(&blk.sched, &t->uc);
#endif
}

void fiber_init(SimThread *t)
{
    t->stack = blk.free_stacks.back();
    blk.free_stacks.pop_back();
    t->state = T_RUN;
    char *top = blk.stacks + (size_t)(t->stack + 1) * (kStack + kPage);
#if defined(__x86_64__)
    uint64_t *sp = (uint64_t *)top;
    *--sp = 0;                     /* fiber_main's return address: never used */
    *--sp = (uint64_t)&fiber_main; /* pd_sim_swap returns here */
    for (int r = 0; r < 6; r++)    /* rbp, rbx, r12-r15 */
        *--sp = 0;
    t->sp = sp;
#else
    getcontext(&t->uc);
    t->uc.uc_stack.ss_sp = top - kStack;
    t->uc.uc_stack.ss_size = kStack;
    t->uc.uc_link = nullptr;
    makecontext(&t->uc, fiber_main, 0);
#endif
}

bool stacks_init()
{
    if (blk.stacks)
        return true;
    size_t bytes = (size_t)kMaxThreads * (kStack + kPage);
    void *p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return false;
    blk.stacks = (char *)p;
    const char *st = getenv("PD_CUDASIM_STATS");
    if (st && *st == '1')
        atexit(print_stats);
    for (int i = 0; i < kMaxThreads; i++) /* a guard page below each stack */
        mprotect(blk.stacks + (size_t)i * (kStack + kPage), kPage, PROT_NONE);
    blk.th.resize(kMaxThreads);
    for (int i = kMaxThreads - 1; i >= 0; i--)
        blk.free_stacks.push_back(i);
    return true;
}

const char *site_file = "";
int site_line = 0;

bool fail_block(const char *why)
{
    say("kernel launched at %s:%d, block (%u,%u,%u): %s", site_file, site_line,
        blk.th[0].t.bid.x, blk.th[0].t.bid.y, blk.th[0].t.bid.z, why);
    blk.failed = true;
    return false;
}

/* Releases the lanes of warp w waiting on one operation once every lane that
 * operation names is there. Returns whether any were released; false with
 * blk.failed set when they disagree. */
bool release_warp(int w)
{
    int lo = w * 32, hi = lo + 32 < blk.n ? lo + 32 : blk.n;
    bool released = false;
    for (int i = lo; i < hi; i++) {
        SimThread &a = blk.th[i];
        if (a.state != T_WARP)
            continue;
        unsigned mask = a.mask;
        if (!(mask >> (i - lo) & 1))
            return fail_block("a warp operation whose mask leaves out its own lane");
        bool ready = true;
        for (int l = 0; l < 32; l++) {
            if (!(mask >> l & 1))
                continue;
            if (lo + l >= hi)
                return fail_block(
                    "a warp operation naming a lane the block does not have");
            SimThread &b = blk.th[lo + l];
            if (b.state != T_WARP || b.mask != mask) {
                ready = false;
                break;
            }
        }
        if (!ready)
            continue;
        for (int l = 0; l < 32; l++) {
            if (!(mask >> l & 1))
                continue;
            SimThread &b = blk.th[lo + l];
            if (b.op != a.op || b.width != a.width ||
                ((a.op == pd_sim::WARP_XOR || a.op == pd_sim::WARP_UP ||
                  a.op == pd_sim::WARP_DOWN) &&
                 b.param != a.param))
                return fail_block("the lanes of one warp operation disagree on it");
        }
        unsigned ballot = 0;
        for (int l = 0; l < 32; l++)
            if (mask >> l & 1 && blk.th[lo + l].val)
                ballot |= 1u << l;
        for (int l = 0; l < 32; l++) {
            if (!(mask >> l & 1))
                continue;
            SimThread &b = blk.th[lo + l];
            int width = b.width, g0 = l & ~(width - 1), src = l; /* width: 2^k <= 32 */
            switch (b.op) {
            case pd_sim::WARP_XOR:
                src = l ^ b.param;
                if (src < 0 || src >= 32 || (src & ~(width - 1)) != g0)
                    src = l;
                break;
            case pd_sim::WARP_IDX:
                src = g0 + (b.param & (width - 1));
                break;
            case pd_sim::WARP_UP:
                src = l - b.param >= g0 ? l - b.param : l;
                break;
            case pd_sim::WARP_DOWN:
                src = l + b.param < g0 + width ? l + b.param : l;
                break;
            default:
                break;
            }
            if (b.op == pd_sim::WARP_BALLOT)
                b.res = ballot;
            else if (b.op == pd_sim::WARP_ANY)
                b.res = ballot != 0;
            else if (b.op == pd_sim::WARP_ALL)
                b.res = ballot == mask;
            else if (b.op == pd_sim::WARP_SYNC)
                b.res = 0;
            else {
                if (!(mask >> src & 1))
                    return fail_block("a shuffle reads a lane outside its mask");
                b.res = blk.th[lo + src].val;
            }
        }
        for (int l = 0; l < 32; l++)
            if (mask >> l & 1)
                blk.th[lo + l].state = T_RUN;
        released = true;
    }
    return released;
}

/* Runs the lanes of warp w, each up to its next barrier or warp operation, in lane
 * order, as long as the warp's operations complete: a warp runs as far ahead of the
 * others as it can before the next one starts, so that a missing __syncthreads (one
 * warp reading what another has not written yet, or overwriting what another has not
 * read yet) changes the result, and a missing __syncwarp the same within a warp. */
void run_warp(int w)
{
    int lo = w * 32, hi = lo + 32 < blk.n ? lo + 32 : blk.n;
    blk.warp_end = hi;
    do {
        n_pass++;
        for (int i = lo; i < hi;) {
            SimThread &t = blk.th[i];
            if (t.state != T_RUN && t.state != T_NEW) {
                i++;
                continue;
            }
            if (t.state == T_NEW)
                fiber_init(&t);
            run_fiber(&t);
            if (blk.ended_stack >= 0) {
                blk.free_stacks.push_back(blk.ended_stack);
                blk.ended_stack = -1;
            }
            i = blk.resume_from;
        }
    } while (release_warp(w));
}

/* Warps run in order (in reverse order in odd-numbered blocks: both are schedules a GPU
 * may pick), each as far as it goes, until every live thread waits at __syncthreads. */
void run_block(bool reverse)
{
    int nw = (blk.n + 31) / 32;
    for (;;) {
        for (int k = 0; k < nw; k++) {
            run_warp(reverse ? nw - 1 - k : k);
            if (blk.failed)
                return;
        }
        int live = 0, at_bar = 0;
        for (int i = 0; i < blk.n; i++) {
            live += blk.th[i].state != T_DONE;
            at_bar += blk.th[i].state == T_BAR;
        }
        if (!live)
            return;
        if (at_bar == live) {
            for (int i = 0; i < blk.n; i++)
                if (blk.th[i].state == T_BAR)
                    blk.th[i].state = T_RUN;
            continue;
        }
        char why[160];
        snprintf(why, sizeof why,
                 "deadlock: %d of %d live threads at __syncthreads, the others at warp "
                 "operations whose lanes never all arrive",
                 at_bar, live);
        fail_block(why);
        return;
    }
}

std::map<const void *, int>
    func_dyn_smem; /* cudaFuncAttributeMaxDynamicSharedMemorySize */
const int kSmemDefault = 48 << 10;
const int kSmemOptin = 232448; /* sm_90: 227 KiB */

void run_grid(const pd_sim::Cfg &c, const std::function<void()> &body, const char *file,
              int line)
{
    if (sticky != cudaSuccess)
        return;
    blk.n = (int)(c.b.x * c.b.y * c.b.z);
    n_launch++;
    n_block += (unsigned long long)c.g.x * c.g.y * c.g.z;
    n_thread += (unsigned long long)c.g.x * c.g.y * c.g.z * (unsigned long long)blk.n;
    blk.body = &body;
    blk.dyn.resize(c.smem ? c.smem : 16); /* filled with NaN bytes per block, below */
    site_file = file;
    site_line = line;
    for (int i = 0; i < blk.n; i++) {
        SimThread &t = blk.th[i];
        t.t.tid = uint3{(unsigned)i % c.b.x, (unsigned)i / c.b.x % c.b.y,
                        (unsigned)i / (c.b.x * c.b.y)};
        t.t.bdim = c.b;
        t.t.gdim = c.g;
    }
    for (unsigned bz = 0; bz < c.g.z; bz++)
        for (unsigned by = 0; by < c.g.y; by++)
            for (unsigned bx = 0; bx < c.g.x; bx++) {
                for (int i = 0; i < blk.n; i++) {
                    SimThread &t = blk.th[i];
                    t.t.bid = uint3{bx, by, bz};
                    t.state = T_NEW;
                    t.stack = -1;
                    t.cp.clear();
                }
                memset(blk.dyn.data(), 0xff, blk.dyn.size()); /* unwritten: NaN bytes */
                blk.failed = false;
                run_block(((bz * c.g.y + by) * c.g.x + bx) & 1);
                blk.running = nullptr;
                pd_sim::cur = nullptr;
                for (int i = 0; i < blk.n; i++) /* a failed block's fibers are dropped */
                    if (blk.th[i].stack >= 0 && blk.th[i].state != T_DONE)
                        blk.free_stacks.push_back(blk.th[i].stack);
                if (blk.failed) {
                    sticky = cudaErrorLaunchFailure;
                    return;
                }
                for (int i = 0; i < blk.n; i++)
                    if (!blk.th[i].cp.empty()) {
                        fail_block(
                            "a thread ended with cp.async copies it never waited for");
                        sticky = cudaErrorLaunchFailure;
                        return;
                    }
            }
}

} // namespace

/* ------------------------------------------------------------ device side ---- */

namespace pd_sim
{

Thread *cur = nullptr;

void syncthreads()
{
    blk.running->state = T_BAR;
    switch_to_sched();
}

unsigned long long warp_op(int op, unsigned mask, unsigned long long v, int param,
                           int width)
{
    SimThread *t = blk.running;
    if (width <= 0 || width > 32 || (width & (width - 1))) {
        fail_block("a warp operation with a width that is not a power of two <= 32");
        width = 32;
    }
    t->op = op;
    t->mask = mask;
    t->val = v;
    t->param = param;
    t->width = width;
    t->state = T_WARP;
    switch_to_sched();
    return t->res;
}

void *dyn_smem()
{
    return blk.dyn.data();
}

void cp_async16(void *smem, const void *gmem)
{
    if (((uintptr_t)smem | (uintptr_t)gmem) & 15)
        fail_block("cp.async of 16 bytes from or to an address not 16-byte aligned");
    memset(smem, 0xff, 16); /* in flight: reads before the wait see NaN bytes */
    blk.running->cp.push_back(CpAsync{smem, gmem});
}

void cp_async_wait_all()
{
    for (const CpAsync &c : blk.running->cp)
        memcpy(c.dst, c.src, 16);
    blk.running->cp.clear();
}

cudaError_t launch(const void *fn, const Cfg &c, std::function<void()> body,
                   const void *const *ptrs, int nptrs)
{
    std::lock_guard<std::recursive_mutex> g(mu);
    const char *file = c.file;
    int line = c.line;
    if (!have_device())
        return note(cudaErrorNoDevice);
    if (sticky != cudaSuccess)
        return note(sticky);
    unsigned long long nt = (unsigned long long)c.b.x * c.b.y * c.b.z;
    if (!c.b.x || !c.b.y || !c.b.z || !c.g.x || !c.g.y || !c.g.z || nt > 1024 ||
        c.b.x > 1024 || c.b.y > 1024 || c.b.z > 64 || c.g.y > 65535 || c.g.z > 65535 ||
        c.g.x > 2147483647u) {
        say("kernel launched at %s:%d: invalid configuration grid (%u,%u,%u) block "
            "(%u,%u,%u)",
            file, line, c.g.x, c.g.y, c.g.z, c.b.x, c.b.y, c.b.z);
        return note(cudaErrorInvalidConfiguration);
    }
    auto it = func_dyn_smem.find(fn);
    size_t smem_max = it != func_dyn_smem.end() ? (size_t)it->second : kSmemDefault;
    if (c.smem > smem_max) {
        say("kernel launched at %s:%d: %zu bytes of dynamic shared memory, %zu allowed "
            "(cudaFuncAttributeMaxDynamicSharedMemorySize)",
            file, line, c.smem, smem_max);
        return note(cudaErrorInvalidValue);
    }
    for (int i = 0; i < nptrs; i++)
        if (!kernel_reachable(ptrs[i])) {
            say("kernel launched at %s:%d: pointer argument %d (%p) is not device, "
                "pinned or mapped memory",
                file, line, i, ptrs[i]);
            return note(cudaErrorInvalidValue);
        }
    if (!stacks_init())
        return note(cudaErrorMemoryAllocation);
    Cfg cc = c;
    cudaError_t e =
        submit(c.s, [cc, body, file, line]() { run_grid(cc, body, file, line); });
    return note(e);
}

cudaError_t func_set_attribute(const void *fn, int attr, int value)
{
    std::lock_guard<std::recursive_mutex> g(mu);
    if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
        if (value < 0 || value > kSmemOptin)
            return note(cudaErrorInvalidValue);
        func_dyn_smem[fn] = value;
    }
    return cudaSuccess;
}

cudaError_t func_get_attributes(cudaFuncAttributes *a, const void *fn)
{
    std::lock_guard<std::recursive_mutex> g(mu);
    memset(a, 0, sizeof *a);
    a->maxThreadsPerBlock = 1024;
    a->numRegs = 32;
    a->ptxVersion = 90;
    a->binaryVersion = 90;
    auto it = func_dyn_smem.find(fn);
    a->maxDynamicSharedSizeBytes = it != func_dyn_smem.end() ? it->second : kSmemDefault;
    return cudaSuccess;
}

} // namespace pd_sim

/* --------------------------------------------------------------- host API ---- */

#define LOCK std::lock_guard<std::recursive_mutex> lock_(mu)
#define NEED_DEVICE                                                                      \
    do {                                                                                 \
        if (!have_device())                                                              \
            return note(cudaErrorNoDevice);                                              \
    } while (0)

extern "C" {

const char *cudaGetErrorName(cudaError_t e)
{
    switch (e) {
    case cudaSuccess:
        return "cudaSuccess";
    case cudaErrorInvalidValue:
        return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
        return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError:
        return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration:
        return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer:
        return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection:
        return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice:
        return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice:
        return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle:
        return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady:
        return "cudaErrorNotReady";
    case cudaErrorIllegalAddress:
        return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources:
        return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress:
        return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure:
        return "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported:
        return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated:
        return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureImplicit:
        return "cudaErrorStreamCaptureImplicit";
    default:
        return "cudaErrorUnknown";
    }
}

const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess:
        return "no error";
    case cudaErrorInvalidValue:
        return "invalid argument";
    case cudaErrorMemoryAllocation:
        return "out of memory";
    case cudaErrorInvalidConfiguration:
        return "invalid configuration argument";
    case cudaErrorNoDevice:
        return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice:
        return "invalid device ordinal";
    case cudaErrorLaunchFailure:
        return "unspecified launch failure";
    case cudaErrorStreamCaptureUnsupported:
        return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated:
        return "operation failed due to a previous error during capture";
    default:
        return cudaGetErrorName(e);
    }
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return sticky != cudaSuccess ? sticky : e;
}

cudaError_t cudaPeekAtLastError(void)
{
    return sticky != cudaSuccess ? sticky : last_error;
}

cudaError_t cudaGetDeviceCount(int *count)
{
    LOCK;
    *count = have_device() ? device_count : 0;
    return *count ? cudaSuccess : note(cudaErrorNoDevice);
}

cudaError_t cudaSetDevice(int d)
{
    LOCK;
    NEED_DEVICE;
    return d >= 0 && d < device_count ? cudaSuccess : note(cudaErrorInvalidDevice);
}

cudaError_t cudaGetDevice(int *d)
{
    LOCK;
    NEED_DEVICE;
    *d = 0;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int d)
{
    LOCK;
    NEED_DEVICE;
    if (d < 0 || d >= device_count)
        return note(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "cudasim (CPU emulation, sm_90 limits)");
    p->totalGlobalMem = kTotalMem;
    p->sharedMemPerBlock = kSmemDefault;
    p->sharedMemPerBlockOptin = kSmemOptin;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647;
    p->maxGridSize[1] = p->maxGridSize[2] = 65535;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 132;
    p->l2CacheSize = 50 << 20;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d)
{
    LOCK;
    NEED_DEVICE;
    if (d < 0 || d >= device_count)
        return note(cudaErrorInvalidDevice);
    switch (a) {
    case cudaDevAttrMaxThreadsPerBlock:
        *v = 1024;
        break;
    case cudaDevAttrMaxSharedMemoryPerBlock:
        *v = kSmemDefault;
        break;
    case cudaDevAttrMultiProcessorCount:
        *v = 132;
        break;
    case cudaDevAttrComputeCapabilityMajor:
        *v = 9;
        break;
    case cudaDevAttrComputeCapabilityMinor:
        *v = 0;
        break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
        *v = kSmemOptin;
        break;
    default:
        return note(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void)
{
    LOCK;
    NEED_DEVICE;
    if (unsafe_in_capture("cudaDeviceSynchronize"))
        return note(cudaErrorStreamCaptureUnsupported);
    return note(sticky);
}

cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total)
{
    LOCK;
    NEED_DEVICE;
    *total = kTotalMem;
    *free_bytes = kTotalMem - device_used;
    return cudaSuccess;
}

cudaError_t cudaMalloc(void **p, size_t bytes)
{
    LOCK;
    NEED_DEVICE;
    *p = nullptr;
    if (unsafe_in_capture("cudaMalloc"))
        return note(cudaErrorStreamCaptureUnsupported);
    if (sticky != cudaSuccess)
        return note(sticky);
    if (!bytes)
        return cudaSuccess;
    return note(device_alloc(p, bytes));
}

cudaError_t cudaFree(void *p)
{
    LOCK;
    NEED_DEVICE;
    if (!p)
        return cudaSuccess;
    if (unsafe_in_capture("cudaFree"))
        return note(cudaErrorStreamCaptureUnsupported);
    auto it = regions.find((uintptr_t)p);
    if (it == regions.end() || it->second.kind != DEVICE) {
        say("cudaFree(%p): not the start of a device allocation", p);
        return note(cudaErrorInvalidValue);
    }
    Region r = it->second;
    regions.erase(it);
    device_release(r);
    return note(sticky);
}

cudaError_t cudaMallocHost(void **p, size_t bytes)
{
    LOCK;
    NEED_DEVICE;
    *p = nullptr;
    if (unsafe_in_capture("cudaMallocHost"))
        return note(cudaErrorStreamCaptureUnsupported);
    void *m = nullptr;
    if (posix_memalign(&m, kPage, bytes ? bytes : 1))
        return note(cudaErrorMemoryAllocation);
    regions[(uintptr_t)m] = Region{bytes ? bytes : 1, PINNED, 0, 0};
    *p = m;
    return cudaSuccess;
}

cudaError_t cudaFreeHost(void *p)
{
    LOCK;
    if (!p)
        return cudaSuccess;
    auto it = regions.find((uintptr_t)p);
    if (it == regions.end() || it->second.kind != PINNED)
        return note(cudaErrorInvalidValue);
    regions.erase(it);
    free(p);
    return cudaSuccess;
}

cudaError_t cudaHostRegister(void *p, size_t bytes, unsigned flags)
{
    (void)flags;
    LOCK;
    NEED_DEVICE;
    if (!p || !bytes)
        return note(cudaErrorInvalidValue);
    if (unsafe_in_capture("cudaHostRegister"))
        return note(cudaErrorStreamCaptureUnsupported);
    uintptr_t b;
    if (find_region(p, &b) || find_region((char *)p + bytes - 1, &b)) {
        say("cudaHostRegister(%p, %zu): overlaps registered or device memory", p, bytes);
        return note(cudaErrorInvalidValue);
    }
    regions[(uintptr_t)p] = Region{bytes, REGISTERED, 0, 0};
    return cudaSuccess;
}

cudaError_t cudaHostUnregister(void *p)
{
    LOCK;
    auto it = regions.find((uintptr_t)p);
    if (it == regions.end() || it->second.kind != REGISTERED)
        return note(cudaErrorInvalidValue);
    regions.erase(it);
    return cudaSuccess;
}

/* A copy's endpoints: device-side ones must be memory the device reaches; host-side
 * ones anything. Returns false (and says why) for a direction that does not fit. */
static bool copy_ok(void *dst, const void *src, size_t n, enum cudaMemcpyKind k)
{
    auto dev = [n](const void *p) {
        uintptr_t b;
        const Region *r = find_region(p, &b);
        return r && (uintptr_t)p + n <= b + r->bytes;
    };
    bool ok = true;
    if (k == cudaMemcpyHostToDevice || k == cudaMemcpyDeviceToDevice)
        ok = ok && dev(dst);
    if (k == cudaMemcpyDeviceToHost || k == cudaMemcpyDeviceToDevice)
        ok = ok && dev(src);
    if (!ok)
        say("cudaMemcpy(%p <- %p, %zu bytes, kind %d): the device side is not device "
            "memory of that size",
            dst, src, n, (int)k);
    return ok;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, enum cudaMemcpyKind k)
{
    LOCK;
    NEED_DEVICE;
    if (unsafe_in_capture("cudaMemcpy"))
        return note(cudaErrorStreamCaptureUnsupported);
    if (sticky != cudaSuccess)
        return note(sticky);
    if (!n)
        return cudaSuccess;
    if (!copy_ok(dst, src, n, k))
        return note(cudaErrorInvalidValue);
    memmove(dst, src, n);
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, enum cudaMemcpyKind k,
                            cudaStream_t s)
{
    LOCK;
    NEED_DEVICE;
    if (!n)
        return cudaSuccess;
    if (!copy_ok(dst, src, n, k))
        return note(cudaErrorInvalidValue);
    if (stream_of(s)->capturing && (!kernel_reachable(dst) || !kernel_reachable(src))) {
        say("cudaMemcpyAsync from or to pageable host memory while capturing");
        stream_of(s)->invalidated = true;
        return note(cudaErrorStreamCaptureUnsupported);
    }
    return note(submit(s, [dst, src, n]() { memmove(dst, src, n); }));
}

cudaError_t cudaMemset(void *p, int v, size_t n)
{
    LOCK;
    NEED_DEVICE;
    if (unsafe_in_capture("cudaMemset"))
        return note(cudaErrorStreamCaptureUnsupported);
    if (!n)
        return cudaSuccess;
    if (!copy_ok(p, p, n, cudaMemcpyDeviceToDevice))
        return note(cudaErrorInvalidValue);
    memset(p, v, n);
    return note(sticky);
}

cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s)
{
    LOCK;
    NEED_DEVICE;
    if (!n)
        return cudaSuccess;
    if (!copy_ok(p, p, n, cudaMemcpyDeviceToDevice))
        return note(cudaErrorInvalidValue);
    return note(submit(s, [p, v, n]() { memset(p, v, n); }));
}

cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags)
{
    (void)flags;
    LOCK;
    NEED_DEVICE;
    Stream *st = new Stream();
    live_streams.push_back(st);
    *s = (cudaStream_t)(void *)st;
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s)
{
    return cudaStreamCreateWithFlags(s, 0);
}

cudaError_t cudaStreamDestroy(cudaStream_t s)
{
    LOCK;
    if (!s)
        return note(cudaErrorInvalidResourceHandle);
    Stream *st = stream_of(s);
    for (size_t i = 0; i < live_streams.size(); i++)
        if (live_streams[i] == st) {
            live_streams.erase(live_streams.begin() + (long)i);
            delete st;
            return cudaSuccess;
        }
    return note(cudaErrorInvalidResourceHandle);
}

cudaError_t cudaStreamSynchronize(cudaStream_t s)
{
    LOCK;
    NEED_DEVICE;
    if (stream_of(s)->capturing) {
        stream_of(s)->invalidated = true;
        return note(cudaErrorStreamCaptureUnsupported);
    }
    if (unsafe_in_capture("cudaStreamSynchronize"))
        return note(cudaErrorStreamCaptureUnsupported);
    return note(sticky);
}

cudaError_t cudaStreamQuery(cudaStream_t s)
{
    LOCK;
    if (stream_of(s)->capturing) {
        stream_of(s)->invalidated = true;
        return note(cudaErrorStreamCaptureUnsupported);
    }
    return note(sticky);
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, enum cudaStreamCaptureMode mode)
{
    (void)mode;
    LOCK;
    NEED_DEVICE;
    Stream *st = stream_of(s);
    if (!s || st->capturing)
        return note(cudaErrorInvalidValue); /* the legacy stream cannot capture */
    st->capturing = true;
    st->invalidated = false;
    st->capture_thread = std::this_thread::get_id();
    st->nodes.clear();
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g)
{
    LOCK;
    Stream *st = stream_of(s);
    *g = nullptr;
    if (!st->capturing)
        return note(cudaErrorInvalidValue);
    if (st->capture_thread != std::this_thread::get_id())
        return note(cudaErrorStreamCaptureImplicit);
    st->capturing = false;
    if (st->invalidated) {
        st->nodes.clear();
        return note(cudaErrorStreamCaptureInvalidated);
    }
    Graph *gr = new Graph();
    gr->nodes.swap(st->nodes);
    *g = (cudaGraph_t)(void *)gr;
    return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus *status)
{
    LOCK;
    Stream *st = stream_of(s);
    *status = !st->capturing    ? cudaStreamCaptureStatusNone
              : st->invalidated ? cudaStreamCaptureStatusInvalidated
                                : cudaStreamCaptureStatusActive;
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *x, cudaGraph_t g,
                                 unsigned long long flags)
{
    (void)flags;
    LOCK;
    if (!g)
        return note(cudaErrorInvalidValue);
    GraphExec *e = new GraphExec();
    e->nodes = ((Graph *)(void *)g)->nodes;
    *x = (cudaGraphExec_t)(void *)e;
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t x, cudaStream_t s)
{
    LOCK;
    NEED_DEVICE;
    if (!x)
        return note(cudaErrorInvalidValue);
    GraphExec *e = (GraphExec *)(void *)x;
    for (const Work &w : e->nodes) {
        cudaError_t r = submit(s, w);
        if (r != cudaSuccess)
            return note(r);
    }
    return cudaSuccess;
}

cudaError_t cudaGraphDestroy(cudaGraph_t g)
{
    LOCK;
    delete (Graph *)(void *)g;
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t x)
{
    LOCK;
    delete (GraphExec *)(void *)x;
    return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags)
{
    (void)flags;
    LOCK;
    NEED_DEVICE;
    *e = (cudaEvent_t)(void *)new Event();
    return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t *e)
{
    return cudaEventCreateWithFlags(e, 0);
}

cudaError_t cudaEventDestroy(cudaEvent_t e)
{
    LOCK;
    delete (Event *)(void *)e;
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s)
{
    LOCK;
    NEED_DEVICE;
    if (!e)
        return note(cudaErrorInvalidResourceHandle);
    Event *ev = (Event *)(void *)e;
    return note(submit(s, [ev]() { ev->t = now_ms(); }));
}

cudaError_t cudaEventSynchronize(cudaEvent_t e)
{
    LOCK;
    NEED_DEVICE;
    if (!e)
        return note(cudaErrorInvalidResourceHandle);
    if (unsafe_in_capture("cudaEventSynchronize"))
        return note(cudaErrorStreamCaptureUnsupported);
    return note(sticky);
}

cudaError_t cudaEventQuery(cudaEvent_t e)
{
    LOCK;
    if (!e)
        return note(cudaErrorInvalidResourceHandle);
    return note(sticky);
}

cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b)
{
    LOCK;
    if (!a || !b)
        return note(cudaErrorInvalidResourceHandle);
    *ms = (float)(((Event *)(void *)b)->t - ((Event *)(void *)a)->t);
    return cudaSuccess;
}

/* An IPC handle names the exporting process's device arena (its memfd, opened again
 * through /proc) and the allocation's place in it. */
struct IpcHandle {
    char magic[8];
    int32_t pid;
    int32_t fd;
    uint64_t off;   /* the allocation's offset in the arena */
    uint64_t bytes; /* its size */
};
static_assert(sizeof(IpcHandle) <= CUDA_IPC_HANDLE_SIZE, "IPC handle size");
static std::map<uintptr_t, std::pair<void *, size_t>> ipc_maps; /* base -> mapping */

cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t *h, void *p)
{
    LOCK;
    NEED_DEVICE;
    auto it = regions.find((uintptr_t)p);
    if (it == regions.end() || it->second.kind != DEVICE) {
        say("cudaIpcGetMemHandle(%p): not the start of a device allocation", p);
        return note(cudaErrorInvalidValue);
    }
    IpcHandle ih;
    memset(&ih, 0, sizeof ih);
    memcpy(ih.magic, "cudasim", 8);
    ih.pid = (int32_t)getpid();
    ih.fd = arena_fd;
    ih.off = (uint64_t)((char *)p - arena);
    ih.bytes = it->second.bytes;
    memset(h, 0, sizeof *h);
    memcpy(h->reserved, &ih, sizeof ih);
    return cudaSuccess;
}

cudaError_t cudaIpcOpenMemHandle(void **p, cudaIpcMemHandle_t h, unsigned flags)
{
    (void)flags;
    LOCK;
    NEED_DEVICE;
    *p = nullptr;
    IpcHandle ih;
    memcpy(&ih, h.reserved, sizeof ih);
    if (memcmp(ih.magic, "cudasim", 8) || ih.pid <= 0 || ih.fd < 0 || !ih.bytes) {
        say("cudaIpcOpenMemHandle: not a cudasim handle");
        return note(cudaErrorInvalidValue);
    }
    if (ih.pid == (int32_t)getpid()) {
        say("cudaIpcOpenMemHandle: a handle of this same process");
        return note(cudaErrorInvalidValue);
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)ih.pid, (int)ih.fd);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        say("cudaIpcOpenMemHandle: %s: %s", path, strerror(errno));
        return note(cudaErrorInvalidValue);
    }
    uint64_t lo = ih.off / kPage * kPage, len = ih.off + ih.bytes - lo;
    void *m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)lo);
    close(fd);
    if (m == MAP_FAILED)
        return note(cudaErrorMemoryAllocation);
    char *base = (char *)m + (ih.off - lo);
    regions[(uintptr_t)base] = Region{ih.bytes, IPC, 0, 0};
    ipc_maps[(uintptr_t)base] = std::make_pair(m, (size_t)len);
    *p = base;
    return cudaSuccess;
}

cudaError_t cudaIpcCloseMemHandle(void *p)
{
    LOCK;
    auto it = ipc_maps.find((uintptr_t)p);
    if (it == ipc_maps.end())
        return note(cudaErrorInvalidValue);
    munmap(it->second.first, it->second.second);
    ipc_maps.erase(it);
    regions.erase((uintptr_t)p);
    return cudaSuccess;
}

/* ------------------------------------------------------------------ cuBLAS ---- */

struct pd_sim_blas {
    cudaStream_t s;
};

cublasStatus_t cublasCreate_v2(cublasHandle_t *h)
{
    LOCK;
    if (!have_device())
        return CUBLAS_STATUS_NOT_INITIALIZED;
    *h = new pd_sim_blas{nullptr};
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t h)
{
    LOCK;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s)
{
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    h->s = s;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t mode)
{
    (void)mode;
    return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void *ws, size_t bytes)
{
    LOCK;
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    if (bytes && !kernel_reachable(ws))
        return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

static float load_elem(const void *p, cudaDataType t, size_t i)
{
    switch (t) {
    case CUDA_R_32F:
        return ((const float *)p)[i];
    case CUDA_R_16F:
        return pd_sim_f16_bits_to_f32(((const unsigned short *)p)[i]);
    case CUDA_R_16BF: {
        uint32_t x = (uint32_t)((const unsigned short *)p)[i] << 16;
        float f;
        memcpy(&f, &x, 4);
        return f;
    }
    }
    return NAN;
}

cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb,
                            int m, int n, int k, const void *alpha, const void *A,
                            cudaDataType at, int lda, const void *B, cudaDataType bt,
                            int ldb, const void *beta, void *C, cudaDataType ct, int ldc,
                            cublasComputeType_t comp, cublasGemmAlgo_t algo)
{
    (void)algo;
    LOCK;
    if (!h)
        return CUBLAS_STATUS_NOT_INITIALIZED;
    auto type_ok = [](cudaDataType t) {
        return t == CUDA_R_32F || t == CUDA_R_16F || t == CUDA_R_16BF;
    };
    if (m < 0 || n < 0 || k < 0 || !type_ok(at) || !type_ok(bt) || ct != CUDA_R_32F ||
        (comp != CUBLAS_COMPUTE_32F && comp != CUBLAS_COMPUTE_32F_PEDANTIC &&
         comp != CUBLAS_COMPUTE_32F_FAST_TF32) ||
        ta == CUBLAS_OP_C || tb == CUBLAS_OP_C ||
        lda < (ta == CUBLAS_OP_N ? (m > 1 ? m : 1) : (k > 1 ? k : 1)) ||
        ldb < (tb == CUBLAS_OP_N ? (k > 1 ? k : 1) : (n > 1 ? n : 1)) ||
        ldc < (m > 1 ? m : 1))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!m || !n)
        return CUBLAS_STATUS_SUCCESS;
    /* alpha and beta are host pointers (the default pointer mode): read them now */
    float al = *(const float *)alpha, be = *(const float *)beta;
    if (!kernel_reachable(A) || !kernel_reachable(B) || !kernel_reachable(C)) {
        say("cublasGemmEx: a matrix is not device memory");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    cudaError_t e = submit(h->s, [=]() {
        float *c = (float *)C;
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                float acc = 0.0f;
                for (int l = 0; l < k; l++) {
                    size_t ai =
                        ta == CUBLAS_OP_N ? (size_t)l * lda + i : (size_t)i * lda + l;
                    size_t bi =
                        tb == CUBLAS_OP_N ? (size_t)j * ldb + l : (size_t)l * ldb + j;
                    acc += load_elem(A, at, ai) * load_elem(B, bt, bi);
                }
                float *out = c + (size_t)j * ldc + i;
                *out = be == 0.0f ? al * acc : al * acc + be * *out;
            }
    });
    return e == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

} /* extern "C" */
