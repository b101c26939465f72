/*
 * A PKCS#11 module for tests/pkcs11.rs: SoftHSM2 with the outages a test
 * asks for, as a token pulled out or a network HSM that lost its link
 * answers them.
 *
 * Every function is the real module's (the .so named by P11FAULTY_MODULE),
 * except C_Decrypt, C_DeriveKey and C_DecapsulateKey: while the file named
 * by P11FAULTY_COUNT says "C_Decrypt N RV" (or "C_DeriveKey N RV", or
 * "C_DecapsulateKey N RV") with N above zero, that function fails with
 * the return value RV (a number, e.g. 0x32 for CKR_DEVICE_REMOVED, 0x5 for
 * CKR_GENERAL_ERROR), and each failure takes one off N. An optional
 * fourth number S lets the next S calls through first (one off S each).
 * A count file that cannot be rewritten aborts
 * the process, so a test fails at once rather than waiting. A C_Decrypt that fails has been done by the real
 * module first (so the session holds no half-done operation), its output
 * wiped. The test compiles this file with the system's cc and p11-kit's
 * pkcs11.h.
 *
 * A PKCS#11 3.2 module (kryoptic) is also reached through C_GetInterface,
 * whose function list carries C_DecapsulateKey. p11-kit's pkcs11.h is
 * 2.40, so that list is declared here as what the standard lays out: the
 * version, then 104 function pointers, the 68 of 2.40 first in their
 * order, C_DecapsulateKey the 94th.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST ours;
static CK_FUNCTION_LIST_PTR real;
static CK_RV loaded = CKR_GENERAL_ERROR;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* The return value this call of `function` is to fail with (one off the
   count), or CKR_OK. */
static CK_RV fault(const char *function) {
    const char *path = getenv("P11FAULTY_COUNT");
    char named[32] = "";
    long left = 0;
    long rv = CKR_DEVICE_REMOVED;
    long skip = 0;
    int fields = 0;
    CK_RV out = CKR_OK;
    FILE *f;
    if (path == NULL) {
        return CKR_OK;
    }
    pthread_mutex_lock(&lock);
    f = fopen(path, "r");
    if (f != NULL) {
        fields = fscanf(f, "%31s %ld %li %ld", named, &left, &rv, &skip);
        if (fields < 2 || strcmp(named, function) != 0) {
            left = 0;
        }
        fclose(f);
    }
    if (left > 0) {
        if (skip > 0) {
            skip -= 1;
        } else {
            out = (CK_RV)rv;
            left -= 1;
        }
        f = fopen(path, "w");
        if (f == NULL ||
            fprintf(f, "%s %ld 0x%lx %ld\n", function, left, (unsigned long)rv, skip) < 0 ||
            fclose(f) != 0) {
            abort();
        }
    }
    pthread_mutex_unlock(&lock);
    return out;
}

static CK_RV faulty_decrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR in, CK_ULONG in_len,
                            CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
    CK_RV rv = real->C_Decrypt(session, in, in_len, out, out_len);
    CK_RV injected;
    /* A length query (no output buffer) leaves the operation going. */
    if (out == NULL || rv != CKR_OK || (injected = fault("C_Decrypt")) == CKR_OK) {
        return rv;
    }
    memset(out, 0, *out_len);
    return injected;
}

static CK_RV faulty_derive(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                           CK_OBJECT_HANDLE base, CK_ATTRIBUTE_PTR template,
                           CK_ULONG count, CK_OBJECT_HANDLE_PTR key) {
    CK_RV injected = fault("C_DeriveKey");
    if (injected != CKR_OK) {
        return injected;
    }
    return real->C_DeriveKey(session, mechanism, base, template, count, key);
}

/* PKCS#11 3.2's function list and interface (see the top). */
#define FUNCTIONS_3_2 104
#define GET_INTERFACE_AT 69
#define DECAPSULATE_KEY_AT 93
struct list_3_2 {
    CK_VERSION version;
    void *functions[FUNCTIONS_3_2];
};
struct interface {
    CK_UTF8CHAR *name;
    void *list;
    CK_FLAGS flags;
};
typedef CK_RV (*get_interface_fn)(CK_UTF8CHAR *, CK_VERSION *, struct interface **, CK_FLAGS);
typedef CK_RV (*decapsulate_fn)(CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE,
                                CK_ATTRIBUTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG,
                                CK_OBJECT_HANDLE_PTR);
static struct list_3_2 ours_3_2;
static struct interface ours_interface;
static decapsulate_fn real_decapsulate;
static get_interface_fn real_get_interface;

static CK_RV faulty_decapsulate(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                                CK_OBJECT_HANDLE key, CK_ATTRIBUTE_PTR template, CK_ULONG count,
                                CK_BYTE_PTR ciphertext, CK_ULONG ciphertext_len,
                                CK_OBJECT_HANDLE_PTR secret) {
    CK_RV injected = fault("C_DecapsulateKey");
    if (injected != CKR_OK) {
        return injected;
    }
    return real_decapsulate(session, mechanism, key, template, count, ciphertext, ciphertext_len,
                            secret);
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);
CK_RV C_GetInterface(CK_UTF8CHAR *name, CK_VERSION *version, struct interface **interface,
                     CK_FLAGS flags);

/* The real module's default 3.2 interface, ours made of it (NULL list:
   none, or an older one, and the caller takes the 2.40 list). */
static void load_3_2(void) {
    struct interface *theirs = NULL;
    struct list_3_2 *list;
    if (real_get_interface == NULL || real_get_interface(NULL, NULL, &theirs, 0) != CKR_OK ||
        theirs == NULL) {
        return;
    }
    list = theirs->list;
    if (list->version.major != 3 || list->version.minor < 2) {
        return;
    }
    ours_3_2 = *list;
    /* The 2.40 part, with our C_Decrypt and C_DeriveKey. */
    memcpy(&ours_3_2, &ours, sizeof ours);
    ours_3_2.version = list->version;
    ours_3_2.functions[GET_INTERFACE_AT] = (void *)C_GetInterface;
    real_decapsulate = (decapsulate_fn)list->functions[DECAPSULATE_KEY_AT];
    ours_3_2.functions[DECAPSULATE_KEY_AT] = (void *)faulty_decapsulate;
    ours_interface = *theirs;
    ours_interface.list = &ours_3_2;
}

/* The real module's function list, ours made of it (once). */
static void load(void) {
    const char *module = getenv("P11FAULTY_MODULE");
    void *lib = module == NULL ? NULL : dlopen(module, RTLD_NOW | RTLD_LOCAL);
    CK_C_GetFunctionList get;
    if (lib == NULL) {
        return;
    }
    get = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
    if (get == NULL || get(&real) != CKR_OK) {
        return;
    }
    ours = *real;
    ours.C_GetFunctionList = C_GetFunctionList;
    ours.C_Decrypt = faulty_decrypt;
    ours.C_DeriveKey = faulty_derive;
    real_get_interface = (get_interface_fn)dlsym(lib, "C_GetInterface");
    load_3_2();
    loaded = CKR_OK;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
    pthread_once(&once, load);
    if (loaded != CKR_OK) {
        return loaded;
    }
    *list = &ours;
    return CKR_OK;
}

/* The 3.2 interface when the real module has one (only the default one
   is asked for), else none: the caller falls back to C_GetFunctionList. */
CK_RV C_GetInterface(CK_UTF8CHAR *name, CK_VERSION *version, struct interface **interface,
                     CK_FLAGS flags) {
    (void)name;
    (void)version;
    (void)flags;
    pthread_once(&once, load);
    if (loaded != CKR_OK) {
        return loaded;
    }
    *interface = ours_interface.list == NULL ? NULL : &ours_interface;
    return CKR_OK;
}
