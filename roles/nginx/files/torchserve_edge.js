// Refuses, before TorchServe parses it, a body whose structure is absurd for
// one image upload: more multipart parts or form fields than
// $torchserve_max_parts. Everything else goes on to the proxy untouched.
// The body is scanned in 64 KB chunks of nginx's file of it
// (client_body_in_file_only), so the check costs no copy of a large body.
var fs = require('fs');

var CHUNK = 65536;

// Occurrences of needle (a short ASCII string) in the body, counting stops
// past `stop`.
function count(r, needle, stop) {
    var n = 0;
    var scan = function (buf) {
        var i = buf.indexOf(needle);
        while (i !== -1 && n <= stop) {
            n++;
            i = buf.indexOf(needle, i + needle.length);
        }
    };
    var file = r.variables.request_body_file;
    if (!file) {
        var mem = r.requestBuffer;
        if (mem) {
            scan(mem);
        }
        return n;
    }
    var fd = fs.openSync(file, 'r');
    try {
        var buf = Buffer.alloc(CHUNK);
        var pos = 0;
        var got;
        // Chunks overlap by needle.length - 1 bytes, so no match is cut in two
        // and none is counted twice.
        while (n <= stop && (got = fs.readSync(fd, buf, 0, CHUNK, pos)) > 0) {
            scan(got === CHUNK ? buf : buf.subarray(0, got));
            if (got < CHUNK) {
                break;
            }
            pos += got - (needle.length - 1);
        }
    } finally {
        fs.closeSync(fd);
    }
    return n;
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
    } else if (type.startsWith('application/x-www-form-urlencoded')) {
        if (count(r, '&', limit) + 1 > limit) {
            return refuse(r, 'a form body may have at most ' + limit + ' fields');
        }
    }
    r.internalRedirect('@torchserve_predict');
}

export default {check};
