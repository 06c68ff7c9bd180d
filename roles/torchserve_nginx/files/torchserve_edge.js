// Refuses, before TorchServe or the handler parses it, a body whose structure
// is absurd for one image upload: more multipart parts or form fields than
// $torchserve_max_parts. Everything else goes on to the proxy untouched.
// The body is read in 64 KB chunks from nginx's file of it
// (client_body_in_file_only), so the check costs no copy of a large body.
var fs = require('fs');

var CHUNK = 65536;

// Calls visit(chunk, offset) for each chunk of the body until it returns
// false. Chunks overlap by `overlap` bytes, so a short needle is never cut
// in two (callers skip matches that start inside the overlap).
function chunks(r, overlap, visit) {
    var file = r.variables.request_body_file;
    if (!file) {
        var mem = r.requestBuffer;
        if (mem) {
            visit(mem, 0);
        }
        return;
    }
    var fd = fs.openSync(file, 'r');
    try {
        var buf = Buffer.alloc(CHUNK);
        var pos = 0;
        var got;
        while ((got = fs.readSync(fd, buf, 0, CHUNK, pos)) > 0) {
            if (visit(got === CHUNK ? buf : buf.subarray(0, got), pos) === false || got < CHUNK) {
                break;
            }
            pos += got - overlap;
        }
    } finally {
        fs.closeSync(fd);
    }
}

// Occurrences of needle (a short ASCII string), counting stops past `stop`.
function count(r, needle, stop) {
    var n = 0;
    var seen = -1;
    chunks(r, needle.length - 1, function (buf, offset) {
        var i = buf.indexOf(needle);
        while (i !== -1 && n <= stop) {
            if (offset + i > seen) {
                n++;
                seen = offset + i;
            }
            i = buf.indexOf(needle, i + needle.length);
        }
        return n <= stop;
    });
    return n;
}

// The handler form-decodes only an all-ASCII body (a binary --data-binary
// upload is sent as application/x-www-form-urlencoded too, and may hold any
// number of '&' bytes): a non-ASCII byte at the start means no form.
function asciiStart(r) {
    var ascii = true;
    chunks(r, 0, function (buf) {
        for (var i = 0; i < buf.length; i++) {
            if (buf[i] > 0x7f) {
                ascii = false;
                break;
            }
        }
        return false;
    });
    return ascii;
}

function refuse(r, message) {
    r.headersOut['Content-Type'] = 'application/json';
    r.return(400, JSON.stringify({code: 400, type: 'BadRequest', error: 'too_many_parts', message: message}) + '\n');
}

function check(r) {
    var limit = Number(r.variables.torchserve_max_parts);
    var type = (r.headersIn['Content-Type'] || '').trim().toLowerCase();
    if (type.startsWith('multipart/')) {
        // Every part ends where a line starting with "--" begins, whatever
        // boundary the header claims: count those lines, not the claimed boundary.
        if (count(r, '\n--', limit) > limit) {
            return refuse(r, 'a multipart body may have at most ' + limit + ' parts');
        }
    } else if (type.startsWith('application/x-www-form-urlencoded') && asciiStart(r)) {
        if (count(r, '&', limit) + 1 > limit) {
            return refuse(r, 'a form body may have at most ' + limit + ' fields');
        }
    }
    r.internalRedirect('@torchserve_predict');
}

export default {check};
