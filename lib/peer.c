/*
 * Peers: one per remote process, shared by every context and port of this
 * process that talks to it, with the tables of segments in each direction.
 */
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "shm.h"

/*
 * The registry belongs to the process that filled it: after fork() the
 * child finds registry_pid differs from its own and forgets what it copied.
 * Lock order: registry_lock, then a table's mutex.
 */
static pthread_mutex_t   registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct lshm_peer *registry;
static pid_t             registry_pid;
static pthread_once_t    atfork_once = PTHREAD_ONCE_INIT;

/*
 * Hold every lock across fork() so that the child's copies of the registry
 * and the tables are consistent and unlocked, whatever other threads did.
 */
static void atfork_prepare(void)
{
    struct lshm_peer *p;

    pthread_mutex_lock(&registry_lock);
    for (p = registry; p != NULL; p = p->next) {
        pthread_mutex_lock(&p->out.mutex);
        pthread_mutex_lock(&p->in.mutex);
    }
}

static void unlock_tables(void)
{
    struct lshm_peer *p;

    for (p = registry; p != NULL; p = p->next) {
        pthread_mutex_unlock(&p->in.mutex);
        pthread_mutex_unlock(&p->out.mutex);
    }
}

static void atfork_parent(void)
{
    unlock_tables();
    pthread_mutex_unlock(&registry_lock);
}

static void forget_locked(void);

/* The child forgets at once, so that no fd of the parent's lingers in it. */
static void atfork_child(void)
{
    unlock_tables();
    forget_locked();
    pthread_mutex_unlock(&registry_lock);
}

static void register_atfork(void)
{
    /* Without the handlers, peer_get still forgets lazily in a child. */
    if (pthread_atfork(atfork_prepare, atfork_parent, atfork_child) != 0)
        lshm__log("pthread_atfork failed; fork() while peers are busy is unsafe");
}

static void table_init(struct lshm_seg_table *t)
{
    pthread_mutex_init(&t->mutex, NULL);
    t->elts = NULL;
    t->size = 0;
    t->cap = 0;
    t->full_since = 0;
    t->failed = false;
    t->free_then = UINT32_MAX;
}

/* Room for n segments, growing as Unit's port_mmap_at does. */
static int table_reserve(struct lshm_seg_table *t, uint32_t n)
{
    struct lshm_seg **elts;
    uint32_t cap;

    if (n <= t->cap)
        return 0;
    if (n > UINT32_MAX / 2)
        return -ENOMEM;
    cap = t->cap != 0 ? t->cap : n;
    while (n > cap)
        cap = cap < 16 ? cap * 2 : cap + cap / 2;
    elts = realloc(t->elts, (size_t)cap * sizeof(*elts));
    if (elts == NULL)
        return -ENOMEM;
    memset(elts + t->cap, 0, (size_t)(cap - t->cap) * sizeof(*elts));
    t->elts = elts;
    t->cap = cap;
    return 0;
}

static void table_release(struct lshm_seg_table *t)
{
    uint32_t i;

    for (i = 0; i < t->size; i++)
        lshm__seg_unref(t->elts[i]);
    free(t->elts);
    pthread_mutex_destroy(&t->mutex);
}

/*
 * In a forked child the mappings are absent (MADV_DONTFORK) and the address
 * range may since hold something else: never unmap, only close and free.
 * A buffer of the parent's still pointing at a segment keeps its struct.
 */
static void table_forget(struct lshm_seg_table *t)
{
    uint32_t i;

    for (i = 0; i < t->size; i++) {
        struct lshm_seg *seg = t->elts[i];

        seg->hdr = NULL;
        seg->data = NULL;
        lshm__seg_close_fd(seg);
        lshm__seg_unref(seg);
    }
    free(t->elts);
    pthread_mutex_destroy(&t->mutex);
}

static void forget_locked(void)
{
    struct lshm_peer *p, *next;

    for (p = registry; p != NULL; p = next) {
        next = p->next;
        table_forget(&p->out);
        table_forget(&p->in);
        free(p->socks);
        free(p);
    }
    registry = NULL;
    registry_pid = getpid();
}

static void check_owner_locked(void)
{
    if (registry_pid != getpid())
        forget_locked();
}

void lshm__peers_forget(void)
{
    pthread_mutex_lock(&registry_lock);
    check_owner_locked();
    pthread_mutex_unlock(&registry_lock);
}

/* Has the other end closed every port of p?  Registry lock held. */
static bool all_hung_up(const struct lshm_peer *p)
{
    unsigned i;

    if (p->nsocks == 0)
        return false;
    for (i = 0; i < p->nsocks; i++) {
        struct pollfd pfd = { .fd = p->socks[i], .events = POLLRDHUP };

        if (poll(&pfd, 1, 0) != 1 || !(pfd.revents & (POLLRDHUP | POLLHUP)))
            return false;
    }
    return true;
}

static void unlink_locked(struct lshm_peer *peer)
{
    struct lshm_peer **pp;

    for (pp = &registry; *pp != NULL && *pp != peer; pp = &(*pp)->next)
        ;
    if (*pp != NULL)
        *pp = peer->next;
}

int lshm__peer_get(pid_t pid, struct lshm_peer **peer)
{
    return lshm__peer_get_sock(pid, -1, peer);
}

int lshm__peer_get_sock(pid_t pid, int sock, struct lshm_peer **peer)
{
    struct lshm_peer *p;

    if (pid <= 0)
        return -EINVAL;
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&registry_lock);
    check_owner_locked();
    for (p = registry; p != NULL; p = p->next)
        if (p->pid == pid)
            break;
    if (p != NULL && sock >= 0 && all_hung_up(p)) {
        /* Its ports here are closed at the other end: a new pair. */
        unlink_locked(p);
        p->detached = true;
        p = NULL;
    }
    if (sock >= 0 && p != NULL && p->nsocks == p->capsocks) {
        unsigned cap = p->capsocks * 2 + 4;
        int *socks = realloc(p->socks, cap * sizeof(*socks));

        if (socks == NULL) {
            pthread_mutex_unlock(&registry_lock);
            return -ENOMEM;
        }
        p->socks = socks;
        p->capsocks = cap;
    }
    if (p == NULL) {
        p = calloc(1, sizeof(*p));
        if (p == NULL) {
            pthread_mutex_unlock(&registry_lock);
            return -ENOMEM;
        }
        p->pid = pid;
        table_init(&p->out);
        table_init(&p->in);
        if (sock >= 0 && (p->socks = malloc(4 * sizeof(*p->socks))) == NULL) {
            free(p);
            pthread_mutex_unlock(&registry_lock);
            return -ENOMEM;
        }
        p->capsocks = sock >= 0 ? 4 : 0;
        p->next = registry;
        registry = p;
    }
    if (sock >= 0)
        p->socks[p->nsocks++] = sock;
    p->refs++;
    pthread_mutex_unlock(&registry_lock);
    *peer = p;
    return 0;
}

void lshm__peer_put(struct lshm_peer *peer)
{
    lshm__peer_put_sock(peer, -1);
}

void lshm__peer_hang_up(struct lshm_peer *peer, int sock)
{
    unsigned i;

    pthread_mutex_lock(&registry_lock);
    for (i = 0; i < peer->nsocks; i++) {
        if (peer->socks[i] == sock) {
            peer->socks[i] = peer->socks[--peer->nsocks];
            if (peer->nsocks == 0 && !peer->detached) {
                unlink_locked(peer);
                peer->detached = true;
            }
            break;
        }
    }
    pthread_mutex_unlock(&registry_lock);
}

void lshm__peer_put_sock(struct lshm_peer *peer, int sock)
{
    struct lshm_peer **pp;
    unsigned i;

    if (peer == NULL)
        return;
    pthread_mutex_lock(&registry_lock);
    /* A peer of the parent's, put in a forked child, is gone already. */
    check_owner_locked();
    for (pp = &registry; *pp != NULL && *pp != peer; pp = &(*pp)->next)
        ;
    if (*pp == NULL && !peer->detached) {
        pthread_mutex_unlock(&registry_lock);
        return;
    }
    for (i = 0; sock >= 0 && i < peer->nsocks; i++) {
        if (peer->socks[i] == sock) {
            peer->socks[i] = peer->socks[--peer->nsocks];
            break;
        }
    }
    if (--peer->refs > 0) {
        pthread_mutex_unlock(&registry_lock);
        return;
    }
    if (*pp != NULL)
        *pp = peer->next;
    pthread_mutex_unlock(&registry_lock);

    table_release(&peer->out);
    table_release(&peer->in);
    free(peer->socks);
    free(peer);
}

static bool find_free(struct lshm_seg_table *t, uint16_t port_id, bool tracking,
                      struct lshm_alloc *out)
{
    uint32_t i;

    for (i = 0; i < t->size; i++) {
        struct lshm_seg *seg = t->elts[i];
        uint16_t over = __atomic_load_n(&seg->hdr->sent_over, __ATOMIC_ACQUIRE);
        uint32_t c = 0;

        if (over != LSHM_SENT_OVER_ANY && over != port_id)
            continue;
        if (lshm__chunk_get_free(tracking ? seg->hdr->free_tracking_map
                                         : seg->hdr->free_map, &c)) {
            lshm__seg_ref(seg);
            out->seg = seg;
            out->chunk = c;
            out->created = false;
            return true;
        }
    }
    return false;
}

/*
 * Segment ids are ordered per process pair, but ports to one process are
 * not ordered with each other: the MMAP of a new segment may only go out
 * once the receiver has mapped every segment another port announced.
 */
static bool other_port_pending(struct lshm_seg_table *t, uint16_t port_id)
{
    uint32_t i;

    for (i = 0; i < t->size; i++) {
        uint16_t over = __atomic_load_n(&t->elts[i]->hdr->sent_over, __ATOMIC_ACQUIRE);

        if (over != LSHM_SENT_OVER_ANY && over != port_id)
            return true;
    }
    return false;
}

static void set_oosm(struct lshm_seg_table *t, uint16_t port_id)
{
    uint32_t i;

    for (i = 0; i < t->size; i++) {
        struct lshm_segment_header *hdr = t->elts[i]->hdr;
        uint16_t over = __atomic_load_n(&hdr->sent_over, __ATOMIC_ACQUIRE);

        if (over == LSHM_SENT_OVER_ANY || over == port_id)
            __atomic_store_n(&hdr->oosm, 1, __ATOMIC_SEQ_CST);
    }
}

/* Has the receiver taken oosm from a usable segment since set_oosm? */
static bool reader_gave_back(struct lshm_seg_table *t, uint16_t port_id)
{
    uint32_t i;

    for (i = 0; i < t->size; i++) {
        struct lshm_segment_header *hdr = t->elts[i]->hdr;
        uint16_t over = __atomic_load_n(&hdr->sent_over, __ATOMIC_ACQUIRE);

        if ((over == LSHM_SENT_OVER_ANY || over == port_id) &&
            __atomic_load_n(&hdr->oosm, __ATOMIC_ACQUIRE) == 0)
            return true;
    }
    return false;
}

/*
 * May segment number t->size be made, all the others being full?  The
 * first LSHM_SEGMENTS_AT_ONCE always; past them, only once they were found
 * full LSHM_GROW_WAIT_MS ago and the receiver has given no chunk back since
 * (it takes the oosm flag set then when it frees one).  The segments a
 * sender keeps full are the bytes on their way: a reader that keeps up,
 * however slowly, reads them from cache when there are few, from DRAM when
 * there are many.  Table mutex held.
 */
static bool grow_is_due(struct lshm_seg_table *t, uint16_t port_id, long long now)
{
    if (t->size < LSHM_SEGMENTS_AT_ONCE)
        return true;
    return t->full_since != 0 && now - t->full_since >= LSHM_GROW_WAIT_MS &&
           !reader_gave_back(t, port_id);
}

/* As grow_is_due, and start the wait when it is not. */
static bool may_grow(struct lshm_seg_table *t, uint16_t port_id)
{
    long long now = lshm__now_ms();

    if (grow_is_due(t, port_id, now))
        return true;
    if (t->full_since == 0 || reader_gave_back(t, port_id)) {
        /* Full for the first time, or chunks came back since: wait again. */
        t->full_since = now != 0 ? now : 1;
        set_oosm(t, port_id);
    }
    return false;
}

/* Free chunks in the segments usable by port_id. */
static uint32_t count_free(struct lshm_seg_table *t, uint16_t port_id)
{
    uint32_t i, w, n = 0;

    for (i = 0; i < t->size; i++) {
        struct lshm_segment_header *h = t->elts[i]->hdr;
        uint16_t over = __atomic_load_n(&h->sent_over, __ATOMIC_RELAXED);

        if (over != LSHM_SENT_OVER_ANY && over != port_id)
            continue;
        for (w = 0; w < LSHM_FREE_WORDS; w++)
            n += (uint32_t)__builtin_popcountll(__atomic_load_n(&h->free_map[w],
                                                                __ATOMIC_RELAXED));
    }
    return n;
}

bool lshm__peer_out_has_room(struct lshm_peer *peer, uint16_t port_id, unsigned limit)
{
    struct lshm_seg_table *t = &peer->out;
    uint32_t n;
    bool ready;

    pthread_mutex_lock(&t->mutex);
    /* As lshm__peer_out_alloc: no new segment while one announced on
     * another port is not mapped yet (ids are ordered per process pair). */
    ready = t->size < limit && !other_port_pending(t, port_id) &&
            grow_is_due(t, port_id, lshm__now_ms());
    if (!ready) {
        n = count_free(t, port_id);
        if (!t->failed) {
            ready = n > 0;
        } else if (t->free_then == UINT32_MAX) {
            /*
             * The first look since an allocation failed: what is free now
             * did not serve it (a sender giving back the part of a payload
             * it got is a common case).  Wait for more than that, or a
             * caller retrying at once would spin until the peer frees.
             */
            t->free_then = n;
        } else {
            ready = n > t->free_then;
        }
    }
    pthread_mutex_unlock(&t->mutex);
    return ready;
}

/*
 * Make segment number t->size and put it in the table, which holds its
 * reference.  Table mutex held.
 */
static int grow_locked(struct lshm_peer *peer, uint16_t port_id, bool scrub,
                       struct lshm_seg **out)
{
    struct lshm_seg_table *t = &peer->out;
    struct lshm_seg *seg;
    int ret;

    ret = table_reserve(t, t->size + 1);
    if (ret < 0)
        return lshm__fail(ret, "peer %d: out of memory for the segment table",
                         (int)peer->pid);
    ret = lshm__seg_create(t->size, getpid(), peer->pid, port_id, &seg);
    if (ret < 0)
        return ret;
    seg->scrub = scrub;
    t->elts[t->size++] = seg;
    *out = seg;
    return 0;
}

int lshm__peer_out_make(struct lshm_peer *peer, uint16_t port_id, unsigned want, bool scrub,
                        struct lshm_seg **out)
{
    struct lshm_seg_table *t = &peer->out;
    struct lshm_seg *seg;
    int ret;

    pthread_mutex_lock(&t->mutex);
    if (t->size >= want || other_port_pending(t, port_id)) {
        pthread_mutex_unlock(&t->mutex);
        return 0;
    }
    ret = grow_locked(peer, port_id, scrub, &seg);
    if (ret == 0)
        lshm__seg_ref(seg);
    pthread_mutex_unlock(&t->mutex);
    if (ret < 0)
        return ret;
    *out = seg;
    return 1;
}

int lshm__peer_out_alloc(struct lshm_peer *peer, uint16_t port_id, unsigned limit,
                        bool tracking, bool scrub, struct lshm_alloc *out)
{
    struct lshm_seg_table *t = &peer->out;
    struct lshm_seg *seg;
    uint32_t c = 0;
    int ret;

    pthread_mutex_lock(&t->mutex);
    if (find_free(t, port_id, tracking, out))
        goto done;
    if (other_port_pending(t, port_id) && t->size < limit) {
        pthread_mutex_unlock(&t->mutex);
        return lshm__fail(-EAGAIN, "peer %d: a segment announced on another port is not "
                         "mapped yet", (int)peer->pid);
    }
    if (t->size >= limit || !may_grow(t, port_id)) {
        uint32_t size = t->size;

        set_oosm(t, port_id);
        /*
         * A chunk freed between the search and the flag came with no
         * SHM_ACK; look once more so that it is not waited for in vain.
         */
        if (find_free(t, port_id, tracking, out))
            goto done;
        t->failed = true;
        t->free_then = UINT32_MAX;
        pthread_mutex_unlock(&t->mutex);
        if (size >= limit)
            return lshm__fail(-EAGAIN, "peer %d: all %u shared memory segments are full "
                             "(max_segments, the smaller of the two sides'); wait for chunks "
                             "to come back", (int)peer->pid, limit);
        return lshm__fail(-EAGAIN, "peer %d: all %u segments are full; another is made "
                         "only once the peer has given no chunk back for %d ms (wait with "
                         "LSHM_WAIT_SHM)", (int)peer->pid, size, LSHM_GROW_WAIT_MS);
    }
    ret = grow_locked(peer, port_id, scrub, &seg);
    if (ret < 0) {
        pthread_mutex_unlock(&t->mutex);
        return ret;
    }
    /* Nobody else has seen it yet: this claim cannot fail. */
    if (!lshm__chunk_get_free(tracking ? seg->hdr->free_tracking_map
                                      : seg->hdr->free_map, &c)) {
        t->elts[--t->size] = NULL;
        pthread_mutex_unlock(&t->mutex);
        lshm__seg_unref(seg);
        return lshm__fail(-EIO, "new segment has no free chunk");
    }
    t->full_since = 0;
    t->failed = false;
    lshm__seg_ref(seg);
    out->seg = seg;
    out->chunk = c;
    out->created = true;
    pthread_mutex_unlock(&t->mutex);
    return 0;
done:
    t->failed = false;
    pthread_mutex_unlock(&t->mutex);
    return 0;
}

void lshm__peer_out_drop(struct lshm_peer *peer, struct lshm_seg *seg)
{
    struct lshm_seg_table *t = &peer->out;
    bool last;

    pthread_mutex_lock(&t->mutex);
    last = t->size > 0 && t->elts[t->size - 1] == seg;
    if (last)
        t->elts[--t->size] = NULL;
    pthread_mutex_unlock(&t->mutex);
    if (last)
        lshm__seg_unref(seg);
}

void lshm__peer_out_forget_port(struct lshm_peer *peer, uint16_t port_id)
{
    struct lshm_seg_table *t = &peer->out;
    struct lshm_seg *seg;

    pthread_mutex_lock(&t->mutex);
    while (t->size > 0) {
        seg = t->elts[t->size - 1];
        if (__atomic_load_n(&seg->hdr->sent_over, __ATOMIC_ACQUIRE) != port_id)
            break;
        t->elts[--t->size] = NULL;
        lshm__seg_unref(seg);
    }
    pthread_mutex_unlock(&t->mutex);
}

int lshm__peer_in_add(struct lshm_peer *peer, struct lshm_seg *seg, unsigned limit)
{
    struct lshm_seg_table *t = &peer->in;
    int ret = 0;

    pthread_mutex_lock(&t->mutex);
    if (seg->id != t->size)
        ret = -EPROTO;
    else if (t->size >= limit)
        ret = -ENOSPC;
    else
        ret = table_reserve(t, t->size + 1);
    if (ret == 0) {
        lshm__seg_ref(seg);
        t->elts[t->size++] = seg;
    }
    pthread_mutex_unlock(&t->mutex);
    return ret;
}

uint32_t lshm__peer_in_next(struct lshm_peer *peer)
{
    uint32_t n;

    pthread_mutex_lock(&peer->in.mutex);
    n = peer->in.size;
    pthread_mutex_unlock(&peer->in.mutex);
    return n;
}

static struct lshm_seg *table_get(struct lshm_seg_table *t, uint32_t id)
{
    struct lshm_seg *seg = NULL;

    pthread_mutex_lock(&t->mutex);
    if (id < t->size) {
        seg = t->elts[id];
        lshm__seg_ref(seg);
    }
    pthread_mutex_unlock(&t->mutex);
    return seg;
}

struct lshm_seg *lshm__peer_in_get(struct lshm_peer *peer, uint32_t id)
{
    return table_get(&peer->in, id);
}

struct lshm_seg *lshm__peer_out_get(struct lshm_peer *peer, uint32_t id)
{
    return table_get(&peer->out, id);
}
