/*
 * A PKCS#11 module for tests/pkcs11.rs: SoftHSM2 with the outages a test
 * asks for, as a token pulled out or a network HSM that lost its link
 * answers them.
 *
 * Every function is the real module's (the .so named by P11FAULTY_MODULE),
 * except C_Decrypt and C_DeriveKey: while the file named by
 * P11FAULTY_COUNT says "C_Decrypt N RV" (or "C_DeriveKey N RV") with N
 * above zero, that function fails with the return value RV (a number,
 * e.g. 0x32 for CKR_DEVICE_REMOVED, 0x5 for CKR_GENERAL_ERROR), and each
 * failure takes one off N. A count file that cannot be rewritten aborts
 * the process, so a test fails at once rather than waiting. A C_Decrypt that fails has been done by the real
 * module first (so the session holds no half-done operation), its output
 * wiped. The test compiles this file with the system's cc and p11-kit's
 * pkcs11.h.
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
    CK_RV out = CKR_OK;
    FILE *f;
    if (path == NULL) {
        return CKR_OK;
    }
    pthread_mutex_lock(&lock);
    f = fopen(path, "r");
    if (f != NULL) {
        if (fscanf(f, "%31s %ld %li", named, &left, &rv) < 2 ||
            strcmp(named, function) != 0) {
            left = 0;
        }
        fclose(f);
    }
    if (left > 0) {
        out = (CK_RV)rv;
        f = fopen(path, "w");
        if (f == NULL || fprintf(f, "%s %ld 0x%lx\n", function, left - 1, (unsigned long)rv) < 0 ||
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

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

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
