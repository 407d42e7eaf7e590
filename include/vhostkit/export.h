// vhostkit/export.h: which declarations the shared library exports.
//
// libvhostkit is built with -fvisibility=hidden and -fvisibility-inlines-hidden: nothing
// is visible to programs linking libvhostkit.so unless it is marked VHOSTKIT_API. The
// public headers mark what a device author uses (docs/api.md); everything else (the
// vhost-user codec, the queue workers, details) stays private to the library and may
// change in any release. The static library uses the same objects; the macro does not
// change what a static link sees.
#pragma once

#if defined(__GNUC__) || defined(__clang__)
#define VHOSTKIT_API __attribute__((visibility("default")))
// For a class nested in an exported one that must stay private (a pimpl): nested classes
// take the visibility of the class around them.
#define VHOSTKIT_LOCAL __attribute__((visibility("hidden")))
#else
#define VHOSTKIT_API
#define VHOSTKIT_LOCAL
#endif
